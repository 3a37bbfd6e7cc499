// Philox4x32-10 and maskprune's counter-based values, as host and device inline functions.
//
// The specification is maskprune/rng.py's module docstring (the torch reference is the source of truth;
// tests/test_rng_backends.py compares every backend with it). In short, for element i of the layer
// `layer`, drawn from the 64-bit `seed` on stream `stream`:
//     key = (seed mod 2^32, seed div 2^32),  counter = (i mod 2^32, i div 2^32, layer, stream)
// and the value comes from the first output word x0 (and x1 for kaiming_normal):
//     signed_constant  +scale if x0 < 2^31 else -scale
//     kaiming_uniform  float32((x0 >> 8) - 2^23) * (scale * 2^-23)          in [-scale, scale)
//     uniform          float32(x0 >> 8) * (scale * 2^-24)                     in [0, scale)
//     kaiming_normal   float32(sqrt(-2 ln u1) * cos(2 pi u2)) * scale, u1 = ((x0 >> 8) + 1/2) 2^-24,
//                      u2 = (x1 >> 8) 2^-24, the Box-Muller part in float64.
// Every float32 step is one IEEE rounding of exact operands (nothing a compiler may contract into an FMA),
// so signed_constant, kaiming_uniform and uniform are bit-identical on every backend; kaiming_normal goes
// through the platform's float64 log and cos (glibc on CPU, CUDA's libdevice on GPU): equal except where
// the two straddle a float32 rounding boundary, then 1 ulp apart.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define MP_PHILOX_HD __host__ __device__ __forceinline__
#else
#define MP_PHILOX_HD inline
#endif

namespace maskprune {
namespace philox {

constexpr uint32_t kMulA = 0xD2511F53u, kMulB = 0xCD9E8D57u;   // round multipliers
constexpr uint32_t kBumpA = 0x9E3779B9u, kBumpB = 0xBB67AE85u; // key schedule
constexpr int kRounds = 10;

// The distributions, in the order of the `init` strings the op accepts (cpu/rng_ops.cpp).
enum class Dist : int { kSignedConstant = 0, kKaimingUniform = 1, kKaimingNormal = 2, kUniform = 3 };

struct Words {
  uint32_t x0, x1, x2, x3;
};

// Philox4x32-10 of the counter (c0, c1, c2, c3) under the key (k0, k1).
MP_PHILOX_HD Words philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int r = 0; r < kRounds; ++r) {
    if (r) {
      k0 += kBumpA;
      k1 += kBumpB;
    }
#if defined(__CUDA_ARCH__)
    const uint32_t hi0 = __umulhi(kMulA, c0), lo0 = kMulA * c0;
    const uint32_t hi1 = __umulhi(kMulB, c2), lo1 = kMulB * c2;
#else
    const uint64_t p0 = uint64_t{kMulA} * c0, p1 = uint64_t{kMulB} * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
#endif
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return {c0, c1, c2, c3};
}

// The output words of element i of (seed, layer, stream).
MP_PHILOX_HD Words element_words(uint64_t i, uint64_t seed, uint32_t layer, uint32_t stream) {
  return philox4x32_10(static_cast<uint32_t>(i), static_cast<uint32_t>(i >> 32), layer, stream,
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// The float32 factor each distribution multiplies its integer by: scale, scale * 2^-23 or scale * 2^-24
// (exact for a normal float32 scale >= 2^-100, which the op checks).
MP_PHILOX_HD float dist_step(Dist dist, float scale) {
  switch (dist) {
    case Dist::kKaimingUniform: return scale * 0x1p-23f;
    case Dist::kUniform: return scale * 0x1p-24f;
    default: return scale;
  }
}

// The float32 value of one element from its words; `step` is dist_step(dist, scale).
MP_PHILOX_HD float value_of(Dist dist, const Words& w, float step) {
  switch (dist) {
    case Dist::kSignedConstant: return (w.x0 >> 31) ? -step : step;
    case Dist::kKaimingUniform: return static_cast<float>(static_cast<int32_t>(w.x0 >> 8) - (1 << 23)) * step;
    case Dist::kUniform: return static_cast<float>(w.x0 >> 8) * step;
    default: {  // kaiming_normal: Box-Muller in float64, rounded to float32, then scaled in float32
      const double u1 = (static_cast<double>(w.x0 >> 8) + 0.5) * 0x1p-24;
      const double u2 = static_cast<double>(w.x1 >> 8) * 0x1p-24;
      const double two_pi = 6.283185307179586;  // 2.0 * math.pi, as the reference computes it
      const double z = sqrt(-2.0 * log(u1)) * cos(two_pi * u2);
      return static_cast<float>(z) * step;
    }
  }
}

}  // namespace philox
}  // namespace maskprune
