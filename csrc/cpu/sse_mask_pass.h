// The float32 mask passes written with SSE2 intrinsics (every x86-64 CPU has SSE2), for the common case of
// float32 scores, weights and output. Two things the portable loops in mask_ops.cpp cannot get from the
// compiler: a large W ⊙ M is written with non-temporal stores (`stream`: an output larger than the caches
// would otherwise be read into them before it is overwritten, one extra DRAM read per entry; a small one is
// better left in cache for the GEMM that reads it next), and the fused threshold-and-mask pass keeps its
// window counts in vector registers. Inside a training step these passes run from DRAM, where both matter.
#pragma once

#if defined(__SSE2__)
#define MASKPRUNE_SSE2_MASK_PASS 1
#include <emmintrin.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "../checks.h"
#include "score_signs.h"

namespace maskprune {
namespace sse {

// sign(S) for every lane pattern of a sign byte, as four floats.
struct SignTable {
  __m128 lanes[256];
  SignTable() {
    for (int b = 0; b < 256; ++b) {
      const uint8_t byte = static_cast<uint8_t>(b);
      lanes[b] = _mm_setr_ps(sign_of(&byte, 0), sign_of(&byte, 1), sign_of(&byte, 2), sign_of(&byte, 3));
    }
  }
};

// One element as the portable loops write it: out = w * (key >= thr ? 1 : 0) (a dropped negative weight
// is -0.0, a NaN weight stays NaN), with key = |s| or s.
template <bool kAbs>
inline float masked_value(float w, float s, float thr) {
  const float key = kAbs ? std::abs(s) : s;
  return w * (key >= thr ? 1.0f : 0.0f);
}

// Four floats to a 16-byte aligned address, past the caches or through them.
inline void store4(float* p, __m128 v, bool stream) {
  if (stream) _mm_stream_ps(p, v);
  else _mm_store_ps(p, v);
}

// out[i] = W ⊙ 1[key >= thr] over [begin, end): scalar up to a 16-byte aligned output address, then
// four lanes at a time (streaming stores with `stream`).
template <bool kAbs>
void mask_range(const float* w, const float* s, float* out, float thr, int64_t begin, int64_t end, bool stream) {
  int64_t i = begin;
  for (; i < end && !is_aligned(out + i, 16); ++i) out[i] = masked_value<kAbs>(w[i], s[i], thr);
  const __m128 t = _mm_set1_ps(thr), one = _mm_set1_ps(1.0f);
  const __m128 abs_mask = _mm_castsi128_ps(_mm_set1_epi32(0x7fffffff));
  for (; i + 4 <= end; i += 4) {
    __m128 key = _mm_loadu_ps(s + i);
    if (kAbs) key = _mm_and_ps(key, abs_mask);
    const __m128 keep = _mm_and_ps(_mm_cmpge_ps(key, t), one);  // 1.0 or 0.0 (0.0 for a NaN key)
    store4(out + i, _mm_mul_ps(_mm_loadu_ps(w + i), keep), stream);
  }
  for (; i < end; ++i) out[i] = masked_value<kAbs>(w[i], s[i], thr);
  _mm_sfence();  // the streamed stores are visible to every thread before the pass returns
}

// The fused window pass of threshold_and_mask over [begin, end): out = W ⊙ 1[key >= hi] (streamed with
// `stream`), the number of keys >= hi and of non-finite scores added to `above` and `bad`, and every key in [lo, hi)
// passed to gather(index, key, weight). Few keys lie inside (about 0.2%), so the test per four lanes is a
// rarely taken branch. With `signs` (then begin is a multiple of 4 and `out` 16-byte aligned) the scores'
// signs are packed too, one byte per four scores (see sign_byte).
template <bool kAbs, typename Gather>
void window_mask_range(const float* w, const float* s, float* out, int64_t begin, int64_t end, float lo, float hi,
                       int64_t& above, int64_t& bad, Gather& gather, bool stream, uint8_t* signs = nullptr) {
  const float big = std::numeric_limits<float>::max();
  auto key_at = [&](int64_t i) { return kAbs ? std::abs(s[i]) : s[i]; };
  auto scalar = [&](int64_t a, int64_t b) {  // the unaligned edges, element by element
    for (int64_t i = a; i < b; ++i) {
      const float key = key_at(i);
      out[i] = masked_value<kAbs>(w[i], s[i], hi);
      above += key >= hi;
      bad += !(std::abs(s[i]) <= big);
      if (key >= lo && key < hi) gather(i, key, w[i]);
    }
  };
  int64_t i = begin;
  while (i < end && !is_aligned(out + i, 16)) ++i;
  scalar(begin, i);

  const __m128 vlo = _mm_set1_ps(lo), vhi = _mm_set1_ps(hi), vbig = _mm_set1_ps(big), one = _mm_set1_ps(1.0f);
  const __m128 abs_mask = _mm_castsi128_ps(_mm_set1_epi32(0x7fffffff));
  // per-lane counters: a true comparison is all ones (-1 as an int), so subtracting it counts it
  __m128i v_above = _mm_setzero_si128(), v_bad = _mm_setzero_si128();
  auto flush = [&] {
    alignas(16) int32_t lanes[4];
    _mm_store_si128(reinterpret_cast<__m128i*>(lanes), v_above);
    above += int64_t{lanes[0]} + lanes[1] + lanes[2] + lanes[3];
    _mm_store_si128(reinterpret_cast<__m128i*>(lanes), v_bad);
    bad += int64_t{lanes[0]} + lanes[1] + lanes[2] + lanes[3];
    v_above = v_bad = _mm_setzero_si128();
  };
  constexpr int64_t kFlushEvery = int64_t{1} << 30;  // entries between flushes: a lane counts < 2^31
  int64_t next_flush = i + kFlushEvery;
  for (; i + 4 <= end; i += 4) {
    const __m128 raw = _mm_loadu_ps(s + i);
    const __m128 magnitude = _mm_and_ps(raw, abs_mask);
    const __m128 key = kAbs ? magnitude : raw;
    const __m128 ge_hi = _mm_cmpge_ps(key, vhi);
    store4(out + i, _mm_mul_ps(_mm_loadu_ps(w + i), _mm_and_ps(ge_hi, one)), stream);
    v_above = _mm_sub_epi32(v_above, _mm_castps_si128(ge_hi));
    v_bad = _mm_sub_epi32(v_bad, _mm_castps_si128(_mm_cmpnle_ps(magnitude, vbig)));  // NaN and inf
    if (signs != nullptr) {
      const __m128 zero = _mm_setzero_ps();
      const __m128 negative = _mm_cmplt_ps(raw, zero);  // ordered: false for NaN, as sign_byte
      const __m128 nonzero = _mm_or_ps(negative, _mm_cmpgt_ps(raw, zero));
      signs[i >> 2] = static_cast<uint8_t>(_mm_movemask_ps(negative) | (_mm_movemask_ps(nonzero) << 4));
    }
    const int inside = _mm_movemask_ps(_mm_and_ps(_mm_cmpge_ps(key, vlo), _mm_cmplt_ps(key, vhi)));
    if (inside != 0) {
      for (int lane = 0; lane < 4; ++lane) {
        if (inside & (1 << lane)) gather(i + lane, key_at(i + lane), w[i + lane]);
      }
    }
    if (i >= next_flush) {
      flush();
      next_flush = i + kFlushEvery;
    }
  }
  flush();
  scalar(i, end);
  if (signs != nullptr && i < end) signs[i >> 2] = sign_byte(s + i, end - i);  // the last, partial quad
  _mm_sfence();  // the streamed stores are visible to every thread before the pass returns
}

// dS = (W ⊙ G) ⊙ sign(S) over [begin, end), written over G, with sign(S) read from the packed sign bytes
// (1/16 of the scores' bytes); begin is a multiple of 4. The same products as score_grad_loop, bit for bit.
inline void score_grad_from_signs_range(float* g, const float* w, const uint8_t* signs, int64_t begin, int64_t end) {
  static const SignTable table;
  int64_t i = begin;
  for (; i + 4 <= end; i += 4) {
    const __m128 wg = _mm_mul_ps(_mm_loadu_ps(w + i), _mm_loadu_ps(g + i));
    _mm_storeu_ps(g + i, _mm_mul_ps(table.lanes[signs[i >> 2]], wg));
  }
  for (; i < end; ++i) g[i] = sign_of(signs, i) * (w[i] * g[i]);
}

}  // namespace sse
}  // namespace maskprune
#endif  // __SSE2__
