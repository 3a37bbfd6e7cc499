// CPU kernel of counter_weights_: fills a tensor with maskprune's Philox4x32-10 values (philox.h), element
// i of `out` being element offset + i of the (seed, layer, stream) sequence. Each element stands alone, so
// the work splits over threads in any way without changing a bit.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "../philox.h"
#include "../rng_args.h"
#include "avx512_mask_pass.h"
#include "buffer_pool.h"

namespace maskprune {
namespace {

constexpr int64_t kGrain = 1 << 14;  // elements per task: ~50 us of Philox, well above parallel_for's overhead
constexpr int64_t kBlock = 256;      // elements computed into a float32 buffer, then cast into out

#if defined(__x86_64__) || defined(_M_X64)
#define MASKPRUNE_PHILOX_AVX2 1
#define MASKPRUNE_TARGET_AVX2 __attribute__((target("avx2")))

// (high, low) 32-bit halves of m * a in each of the 8 lanes: vpmuludq on the even lanes, then on the odd
// lanes shifted down, and the halves blended back into place.
MASKPRUNE_TARGET_AVX2 inline void mulhilo8(__m256i m, __m256i a, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// The words x0 (and x1) of elements base .. base + 7, eight Philox4x32-10 at once. The 8 elements must
// share the high word of their index (the caller checks).
MASKPRUNE_TARGET_AVX2 inline void philox8(uint64_t base, uint32_t layer, uint32_t stream, uint32_t k0, uint32_t k1,
                                          uint32_t* x0, uint32_t* x1) {
  const __m256i mul_a = _mm256_set1_epi32(static_cast<int>(philox::kMulA));
  const __m256i mul_b = _mm256_set1_epi32(static_cast<int>(philox::kMulB));
  __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(base))),
                                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  __m256i c1 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(base >> 32)));
  __m256i c2 = _mm256_set1_epi32(static_cast<int>(layer));
  __m256i c3 = _mm256_set1_epi32(static_cast<int>(stream));
  for (int r = 0; r < philox::kRounds; ++r) {
    if (r) {
      k0 += philox::kBumpA;
      k1 += philox::kBumpB;
    }
    __m256i hi0, lo0, hi1, lo1;
    mulhilo8(mul_a, c0, hi0, lo0);
    mulhilo8(mul_b, c2, hi1, lo1);
    c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
    c1 = lo1;
    c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
    c3 = lo0;
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(x0), c0);
  if (x1 != nullptr) _mm256_storeu_si256(reinterpret_cast<__m256i*>(x1), c1);
}

// philox8 twice, interleaved (elements base .. base + 15): two independent dependency chains per round keep
// the multiplier busy while the other chain's shifts and blends run.
MASKPRUNE_TARGET_AVX2 inline void philox16(uint64_t base, uint32_t layer, uint32_t stream, uint32_t k0, uint32_t k1,
                                           uint32_t* x0, uint32_t* x1) {
  const __m256i mul_a = _mm256_set1_epi32(static_cast<int>(philox::kMulA));
  const __m256i mul_b = _mm256_set1_epi32(static_cast<int>(philox::kMulB));
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i lo = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(base)));
  __m256i a0 = _mm256_add_epi32(lo, iota), b0 = _mm256_add_epi32(a0, _mm256_set1_epi32(8));
  __m256i a1 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(base >> 32))), b1 = a1;
  __m256i a2 = _mm256_set1_epi32(static_cast<int>(layer)), b2 = a2;
  __m256i a3 = _mm256_set1_epi32(static_cast<int>(stream)), b3 = a3;
  for (int r = 0; r < philox::kRounds; ++r) {
    if (r) {
      k0 += philox::kBumpA;
      k1 += philox::kBumpB;
    }
    const __m256i key0 = _mm256_set1_epi32(static_cast<int>(k0)), key1 = _mm256_set1_epi32(static_cast<int>(k1));
    __m256i ahi0, alo0, ahi1, alo1, bhi0, blo0, bhi1, blo1;
    mulhilo8(mul_a, a0, ahi0, alo0);
    mulhilo8(mul_a, b0, bhi0, blo0);
    mulhilo8(mul_b, a2, ahi1, alo1);
    mulhilo8(mul_b, b2, bhi1, blo1);
    a0 = _mm256_xor_si256(_mm256_xor_si256(ahi1, a1), key0);
    b0 = _mm256_xor_si256(_mm256_xor_si256(bhi1, b1), key0);
    a1 = alo1;
    b1 = blo1;
    a2 = _mm256_xor_si256(_mm256_xor_si256(ahi0, a3), key1);
    b2 = _mm256_xor_si256(_mm256_xor_si256(bhi0, b3), key1);
    a3 = alo0;
    b3 = blo0;
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(x0), a0);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(x0 + 8), b0);
  if (x1 != nullptr) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(x1), a1);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(x1 + 8), b1);
  }
}

// The words x0 (and x1) of elements base .. base + 31: philox16's two interleaved chains on 16-lane AVX-512F
// vectors (vpmuludq on 512 bits, the halves blended back under a lane mask). The 32 elements must share the
// high word of their index (the caller checks).
// (The all-lanes maskz forms are the plain instructions; GCC 12's plain intrinsics pass an "undefined" vector
// that -Wmaybe-uninitialized reports at every inlining.)
MASKPRUNE_TARGET_AVX512 inline void mulhilo16(__m512i m, __m512i a, __m512i& hi, __m512i& lo) {
  constexpr __mmask8 kAll = 0xFF;
  const __m512i even = _mm512_maskz_mul_epu32(kAll, a, m);
  const __m512i odd = _mm512_maskz_mul_epu32(kAll, _mm512_maskz_srli_epi64(kAll, a, 32), m);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_maskz_slli_epi64(kAll, odd, 32));
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_maskz_srli_epi64(kAll, even, 32), odd);
}

MASKPRUNE_TARGET_AVX512 inline void philox32(uint64_t base, uint32_t layer, uint32_t stream, uint32_t k0, uint32_t k1,
                                             uint32_t* x0, uint32_t* x1) {
  const __m512i mul_a = _mm512_set1_epi32(static_cast<int>(philox::kMulA));
  const __m512i mul_b = _mm512_set1_epi32(static_cast<int>(philox::kMulB));
  const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i lo = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(base)));
  __m512i a0 = _mm512_add_epi32(lo, iota), b0 = _mm512_add_epi32(a0, _mm512_set1_epi32(16));
  __m512i a1 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(base >> 32))), b1 = a1;
  __m512i a2 = _mm512_set1_epi32(static_cast<int>(layer)), b2 = a2;
  __m512i a3 = _mm512_set1_epi32(static_cast<int>(stream)), b3 = a3;
  for (int r = 0; r < philox::kRounds; ++r) {
    if (r) {
      k0 += philox::kBumpA;
      k1 += philox::kBumpB;
    }
    const __m512i key0 = _mm512_set1_epi32(static_cast<int>(k0)), key1 = _mm512_set1_epi32(static_cast<int>(k1));
    __m512i ahi0, alo0, ahi1, alo1, bhi0, blo0, bhi1, blo1;
    mulhilo16(mul_a, a0, ahi0, alo0);
    mulhilo16(mul_a, b0, bhi0, blo0);
    mulhilo16(mul_b, a2, ahi1, alo1);
    mulhilo16(mul_b, b2, bhi1, blo1);
    a0 = _mm512_xor_si512(_mm512_xor_si512(ahi1, a1), key0);
    b0 = _mm512_xor_si512(_mm512_xor_si512(bhi1, b1), key0);
    a1 = alo1;
    b1 = blo1;
    a2 = _mm512_xor_si512(_mm512_xor_si512(ahi0, a3), key1);
    b2 = _mm512_xor_si512(_mm512_xor_si512(bhi0, b3), key1);
    a3 = alo0;
    b3 = blo0;
  }
  _mm512_storeu_si512(x0, a0);
  _mm512_storeu_si512(x0 + 16, b0);
  if (x1 != nullptr) {
    _mm512_storeu_si512(x1, a1);
    _mm512_storeu_si512(x1 + 16, b1);
  }
}

// Which Philox path fill_values takes, decided once: AVX-512F (32 elements a call) where the CPU has it and
// MASKPRUNE_NO_AVX512 is unset, else AVX2 (16), else scalar; MASKPRUNE_PHILOX_AVX2=0 forces scalar. Every path
// computes the same integers (the tests compare each with the reference).
enum class PhiloxIsa { kScalar, kAvx2, kAvx512 };

PhiloxIsa philox_isa() {
  static const PhiloxIsa isa = [] {
    const char* off = std::getenv("MASKPRUNE_PHILOX_AVX2");
    if (!__builtin_cpu_supports("avx2") || (off != nullptr && std::strcmp(off, "0") == 0)) return PhiloxIsa::kScalar;
    return avx512::enabled() ? PhiloxIsa::kAvx512 : PhiloxIsa::kAvx2;
  }();
  return isa;
}

// fill_values' vector paths: the words of a block into small buffers (kWidth elements a Philox call where the
// block's indices allow, then 8, then one), then the values. Inlined into a function compiled for the ISA, so
// the value loop is vectorised for it too.
template <philox::Dist kDist, int kWidth>
__attribute__((always_inline)) inline void fill_values_vector(float* __restrict__ dst, int64_t n, uint64_t base,
                                                              const CounterArgs& a) {
  constexpr int64_t kWords = 256;
  constexpr bool kTwo = kDist == philox::Dist::kKaimingNormal;
  const uint32_t k0 = static_cast<uint32_t>(a.seed), k1 = static_cast<uint32_t>(a.seed >> 32);
  alignas(64) uint32_t x0[kWords], x1[kWords];
  for (int64_t b = 0; b < n; b += kWords) {
    const int64_t m = std::min(kWords, n - b);
    for (int64_t j = 0; j < m;) {
      const uint64_t i = base + static_cast<uint64_t>(b + j);
      if (j + kWidth <= m && static_cast<uint32_t>(i) <= 0xFFFFFFFFu - (kWidth - 1)) {  // no carry into the high word
        if constexpr (kWidth == 32) {
          philox32(i, a.layer, a.stream, k0, k1, x0 + j, kTwo ? x1 + j : nullptr);
        } else {
          philox16(i, a.layer, a.stream, k0, k1, x0 + j, kTwo ? x1 + j : nullptr);
        }
        j += kWidth;
      } else if (j + 8 <= m && static_cast<uint32_t>(i) <= 0xFFFFFFFFu - 7) {
        philox8(i, a.layer, a.stream, k0, k1, x0 + j, kTwo ? x1 + j : nullptr);
        j += 8;
      } else {
        for (int64_t q = j; q < std::min(j + 8, m); ++q) {
          const uint64_t iq = base + static_cast<uint64_t>(b + q);
          const philox::Words w = philox::philox4x32_10(static_cast<uint32_t>(iq), static_cast<uint32_t>(iq >> 32),
                                                        a.layer, a.stream, k0, k1);
          x0[q] = w.x0;
          x1[q] = w.x1;
        }
        j = std::min(j + 8, m);
      }
    }
    for (int64_t j = 0; j < m; ++j) dst[b + j] = philox::value_of(kDist, {x0[j], x1[j], 0, 0}, a.step);
  }
}

template <philox::Dist kDist>
MASKPRUNE_TARGET_AVX2 void fill_values_avx2(float* __restrict__ dst, int64_t n, uint64_t base, const CounterArgs& a) {
  fill_values_vector<kDist, 16>(dst, n, base, a);
}

template <philox::Dist kDist>
MASKPRUNE_TARGET_AVX512 void fill_values_avx512(float* __restrict__ dst, int64_t n, uint64_t base,
                                                const CounterArgs& a) {
  fill_values_vector<kDist, 32>(dst, n, base, a);
}
#endif

// out[j] = value of element base + j for j in [0, n): the float32 values go straight into a float32 out,
// else through a small buffer (an exact cast for float64, round-to-nearest for float16/bfloat16, as torch's).
// Both paths compute the same integers and the same float operations: only the speed differs.
template <philox::Dist kDist>
void fill_values(float* __restrict__ dst, int64_t n, uint64_t base, const CounterArgs& a) {
#ifdef MASKPRUNE_PHILOX_AVX2
  switch (philox_isa()) {
    case PhiloxIsa::kAvx512: return fill_values_avx512<kDist>(dst, n, base, a);
    case PhiloxIsa::kAvx2: return fill_values_avx2<kDist>(dst, n, base, a);
    case PhiloxIsa::kScalar: break;
  }
#endif
  const uint32_t k0 = static_cast<uint32_t>(a.seed), k1 = static_cast<uint32_t>(a.seed >> 32);
  for (int64_t j = 0; j < n; ++j) {
    const uint64_t i = base + static_cast<uint64_t>(j);
    const philox::Words w =
        philox::philox4x32_10(static_cast<uint32_t>(i), static_cast<uint32_t>(i >> 32), a.layer, a.stream, k0, k1);
    dst[j] = philox::value_of(kDist, w, a.step);
  }
}

// body(b, n, v) for each block [b, b + n) of [begin, end) (n <= kBlock), v the float32 values of elements
// offset + b .. offset + b + n - 1: the blocks go through a kBlock buffer on the stack, so they stay in L1.
template <philox::Dist kDist, typename F>
void for_each_value_block(int64_t begin, int64_t end, const CounterArgs& a, F&& body) {
  alignas(32) float v[kBlock];
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t n = std::min(kBlock, end - b);
    fill_values<kDist>(v, n, a.offset + static_cast<uint64_t>(b), a);
    body(b, n, v);
  }
}

template <philox::Dist kDist, typename scalar_t>
void fill_range(scalar_t* out, int64_t begin, int64_t end, const CounterArgs& a) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    fill_values<kDist>(out + begin, end - begin, a.offset + static_cast<uint64_t>(begin), a);
  } else {
    for_each_value_block<kDist>(begin, end, a, [&](int64_t b, int64_t n, const float* v) {
      for (int64_t j = 0; j < n; ++j) out[b + j] = static_cast<scalar_t>(v[j]);
    });
  }
}

template <philox::Dist kDist>
void fill(at::Tensor& out, const CounterArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "counter_weights_", [&] {
    scalar_t* data = out.data_ptr<scalar_t>();
    at::parallel_for(0, out.numel(), kGrain, [&](int64_t begin, int64_t end) {
      fill_range<kDist, scalar_t>(data, begin, end, a);
    });
  });
}

void counter_weights_cpu(at::Tensor& out, c10::string_view init, double scale, int64_t seed, int64_t layer,
                         int64_t stream, int64_t offset) {
  const CounterArgs a = check_counter_args(out, init, scale, seed, layer, stream, offset);
  if (out.numel() == 0) return;
  switch (a.dist) {
    case philox::Dist::kSignedConstant: return fill<philox::Dist::kSignedConstant>(out, a);
    case philox::Dist::kKaimingUniform: return fill<philox::Dist::kKaimingUniform>(out, a);
    case philox::Dist::kKaimingNormal: return fill<philox::Dist::kKaimingNormal>(out, a);
    case philox::Dist::kUniform: return fill<philox::Dist::kUniform>(out, a);
  }
}

// supermask's training draw in one pass (maskprune/masks/supermask.py): with u the "uniform" values of
// (seed, layer, stream), w_eff = W * 1[u < p] and q = p * (1 - p), p = sigmoid(S) computed by the caller
// (torch.sigmoid, so that the mask equals the unfused path's to the bit).
std::tuple<at::Tensor, at::Tensor> supermask_philox_mask_cpu(const at::Tensor& weight, const at::Tensor& probs,
                                                             int64_t seed, int64_t layer, int64_t stream) {
  TORCH_CHECK_TYPE(weight.scalar_type() == at::kFloat, "weight must be float32, got ", weight.scalar_type());
  TORCH_CHECK_TYPE(probs.scalar_type() == at::kFloat, "probs must be float32, got ", probs.scalar_type());
  TORCH_CHECK_VALUE(weight.sizes() == probs.sizes(), "probs must have the weight's shape ", weight.sizes(),
                    ", got ", probs.sizes());
  const at::Tensor w = weight.contiguous(), p = probs.contiguous();
  at::Tensor w_eff = at::empty_like(w), q = at::empty_like(p);
  const CounterArgs a = check_counter_args(w_eff, "uniform", 1.0, seed, layer, stream, 0);
  const float* __restrict__ wd = w.data_ptr<float>();
  const float* __restrict__ pd = p.data_ptr<float>();
  float* __restrict__ od = w_eff.data_ptr<float>();
  float* __restrict__ qd = q.data_ptr<float>();
  at::parallel_for(0, w.numel(), kGrain, [&](int64_t begin, int64_t end) {
    for_each_value_block<philox::Dist::kUniform>(begin, end, a, [&](int64_t b, int64_t n, const float* u) {
      for (int64_t j = 0; j < n; ++j) {
        // W * M with M = 1[u < p] as a float, as the unfused path multiplies (signed zeros, NaN * 0);
        // a select, not a branch: the mask bit is a coin flip the branch predictor cannot learn.
        const float pj = pd[b + j];
        const float keep = u[j] < pj ? 1.0f : 0.0f;
        od[b + j] = wd[b + j] * keep;
        qd[b + j] = pj * (1.0f - pj);
      }
    });
  });
  return {w_eff, q};
}

// ---- seed mode (issue 18 §3): W regenerated block by block (for_each_value_block) inside the
// mask pass and the dS pass, never stored. Each pass computes exactly what mask_loop / score_grad_loop
// (mask_ops.cpp) compute from the stored float32 weight, so the two modes agree bit for bit.

template <philox::Dist kDist, bool kAbs, typename out_t>
void seed_mask_range(const float* __restrict__ s, out_t* __restrict__ out, float thr, int64_t begin, int64_t end,
                     const CounterArgs& a) {
  for_each_value_block<kDist>(begin, end, a, [&](int64_t b, int64_t n, const float* w) {
    for (int64_t j = 0; j < n; ++j) {
      const float key = kAbs ? std::abs(s[b + j]) : s[b + j];
      const float keep = key >= thr ? 1.0f : 0.0f;  // w * keep: a dropped negative weight is -0.0, as mask_loop's
      out[b + j] = static_cast<out_t>(w[j] * keep);
    }
  });
}

template <philox::Dist kDist, bool kAbs>
void seed_grad_range(float* __restrict__ g, const float* __restrict__ s, int64_t begin, int64_t end,
                     const CounterArgs& a) {
  for_each_value_block<kDist>(begin, end, a, [&](int64_t b, int64_t n, const float* w) {
    for (int64_t j = 0; j < n; ++j) {
      const float v = w[j] * g[b + j];
      if constexpr (kAbs) {
        const float sj = s[b + j];
        g[b + j] = ((sj > 0.0f ? 1.0f : 0.0f) - (sj < 0.0f ? 1.0f : 0.0f)) * v;
      } else {
        g[b + j] = v;
      }
    }
  });
}

at::Tensor seed_apply_mask_cpu(const at::Tensor& scores, const at::Tensor& t, bool abs_scores, c10::string_view init,
                               double scale, int64_t seed, int64_t layer, std::optional<at::ScalarType> dtype) {
  const CounterArgs a = check_seed_key(scores, init, scale, seed, layer);
  check_seed_threshold(scores, t);
  const auto out_dtype = seed_out_dtype(dtype);
  const at::Tensor s = scores.contiguous();
  at::Tensor out = pooled_empty(s.sizes(), s.options().dtype(out_dtype));  // the cache apply_mask's W ⊙ M uses
  if (s.numel() == 0) return out;
  const float thr = t.item<float>();
  const float* sp = s.data_ptr<float>();
  with_dist(a.dist, [&](auto dist) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "seed_apply_mask", [&] {
      scalar_t* op = out.data_ptr<scalar_t>();
      at::parallel_for(0, s.numel(), kGrain, [&](int64_t begin, int64_t end) {
        if (abs_scores) seed_mask_range<decltype(dist)::value, true>(sp, op, thr, begin, end, a);
        else seed_mask_range<decltype(dist)::value, false>(sp, op, thr, begin, end, a);
      });
    });
  });
  return out;
}

void seed_score_grad_cpu(at::Tensor& grad_weight, const at::Tensor& scores, bool abs_scores, c10::string_view init,
                         double scale, int64_t seed, int64_t layer) {
  const CounterArgs a = check_seed_key(scores, init, scale, seed, layer);
  check_seed_grad(grad_weight, scores);
  if (grad_weight.numel() == 0) return;
  const at::Tensor s = scores.contiguous();
  const float* sp = s.data_ptr<float>();
  float* gp = grad_weight.data_ptr<float>();
  with_dist(a.dist, [&](auto dist) {
    at::parallel_for(0, s.numel(), kGrain, [&](int64_t begin, int64_t end) {
      if (abs_scores) seed_grad_range<decltype(dist)::value, true>(gp, sp, begin, end, a);
      else seed_grad_range<decltype(dist)::value, false>(gp, sp, begin, end, a);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(maskprune, CPU, m) {
  m.impl("counter_weights_", &counter_weights_cpu);
  m.impl("supermask_philox_mask", &supermask_philox_mask_cpu);
  m.impl("seed_apply_mask", &seed_apply_mask_cpu);
  m.impl("seed_score_grad_", &seed_score_grad_cpu);
}

}  // namespace maskprune
