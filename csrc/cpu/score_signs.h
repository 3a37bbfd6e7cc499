// sign(S) packed two bits per score, four scores per byte: bit j (j < 4) says score 4q + j of quad q is
// negative, bit 4 + j that it is nonzero (so -0.0 and 0.0 have sign 0). The CPU mask pass writes these for
// the backward, whose score-gradient pass then reads 1/16 of the scores' bytes instead of the scores.
#pragma once

#include <cstdint>

namespace maskprune {

// The sign byte of the `count` (1 to 4) scores from s[0].
template <typename score_t>
inline uint8_t sign_byte(const score_t* s, int64_t count) {
  uint8_t byte = 0;
  for (int64_t j = 0; j < count; ++j) {
    byte |= static_cast<uint8_t>((s[j] < score_t(0)) << j);
    byte |= static_cast<uint8_t>(((s[j] < score_t(0)) | (s[j] > score_t(0))) << (4 + j));  // NaN: sign 0
  }
  return byte;
}

// sign(S) of score i: -1, 0 or 1.
inline float sign_of(const uint8_t* signs, int64_t i) {
  const unsigned byte = signs[i >> 2], lane = static_cast<unsigned>(i & 3);
  const float magnitude = static_cast<float>((byte >> (4 + lane)) & 1u);
  return ((byte >> lane) & 1u) ? -magnitude : magnitude;
}

}  // namespace maskprune
