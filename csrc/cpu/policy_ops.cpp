// The mask policies' fused passes (issue 17): one mask pass and one score-gradient pass whose rule is picked
// by `mode`, so that what a policy changes in the math rides on the passes edge-popup already makes instead of
// extra passes over W (docs/design.md §3: the mask once per step). Modes (maskprune.reference is the oracle):
//   "topk"    M = 1[|S| >= t],  W_eff = W ⊙ M,               dS = sign(S) ⊙ W ⊙ g    (edge-popup)
//   "raw"     M = 1[S >= t],    W_eff = W ⊙ M,               dS = W ⊙ g              (threshold, gem_miner)
//   "signed"  M = 1[|S| >= t],  W_eff = W ⊙ sign(S) ⊙ M,     dS = W ⊙ g              (signed supermask)
//   "binary"  M = 1[|S| >= t],  W_eff = α sign(W) ⊙ M,       dS = sign(S) ⊙ W ⊙ g    (biprop; α = ‖M⊙W‖₁/‖M‖₀)
//   "sampled" M = 1[u < σ(S)],  W_eff = W ⊙ M,               dS = σ'(S) ⊙ W ⊙ g      (supermask; u an input)
// (g = ∂L/∂W_eff.) policy_mask returns (Q, α) with W_eff = α Q: α is found in the same pass that writes Q
// (1 for every mode but "binary"), and policy_masked_linear applies it to the GEMM's output (and to dX) rather
// than in a pass over W. The ops here are CPU kernels; CUDA has its own (cuda/policy_ops.cu) and Triton its own
// (maskprune/kernels/policy.py), which maskprune.ops runs on CUDA by default.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "../masked_linear.h"
#include "../policy_args.h"
#include "avx512_mask_pass.h"
#include "buffer_pool.h"

namespace maskprune {
namespace {

using Mode = PolicyMode;

Mode parse_mode(c10::string_view mode) { return parse_policy_mode(mode); }

constexpr int64_t kGrain = 1 << 15;

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor in the CPU kernel of a policy op, got ",
                    t.device());
}

// e^x for float32, branch-free and vectorisable (Cephes expf: |relative error| < 2 ulp on [-87, 88]); glibc's
// expf is not vectorised without -ffast-math, and a scalar call per weight made the sampled pass 10x slower.
#if defined(__GNUC__)
#define MP_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define MP_ALWAYS_INLINE inline
#endif

// (always inlined: a call per weight kept the loops from vectorising)
MP_ALWAYS_INLINE float exp_approx(float x) {
  // clamped to [-87, 88] with 0/1 factors: GCC vectorises these selects (not std::min/max, whose nested float
  // branches it does not if-convert without -fno-trapping-math); x is finite (the scores are)
  const float over = static_cast<float>(x > 88.0f), under = static_cast<float>(x < -87.0f);
  x = x * (1.0f - over - under) + 88.0f * over - 87.0f * under;
  const float k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  float r = x - k * 0.693359375f;
  r = r - k * -2.12194440e-4f;
  const float r2 = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

template <typename score_t>
MP_ALWAYS_INLINE score_t sigmoid_of(score_t s) {
  if constexpr (std::is_same_v<score_t, float>) {
    return 1.0f / (1.0f + exp_approx(-s));
  } else {
    return score_t(1) / (score_t(1) + std::exp(-s));
  }
}

// ---- supermask's float32 passes, also compiled for AVX2 and AVX-512F and chosen at run time ----
// σ(S) per weight makes the sampled mask pass and its dS pass compute-bound: ~2 ns per weight in SSE2 against
// ~0.2 ns for a plain mask pass. The same loops built for AVX2 / AVX-512F run about 2x / 3x faster. The build
// has no FMA contraction (setup.py: -ffp-contract=off), so every path gives the SSE2 path's bits
// (tests/test_policy_ops.py compares them through MASKPRUNE_NO_AVX512 and MASKPRUNE_NO_AVX2).

// out = W ⊙ 1[u < σ(S)], deriv = σ'(S) ⊙ W: mask_slice's "sampled" rule for float32 operands.
MP_ALWAYS_INLINE void sampled_mask_loop(const float* __restrict__ w, const float* __restrict__ s,
                                        const float* __restrict__ u, float* __restrict__ out,
                                        float* __restrict__ deriv, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const float p = sigmoid_of(s[i]);
    const float keep = static_cast<float>(u[i] < p);  // 1 or 0 with no branch (a select did not if-convert here)
    out[i] = w[i] * keep;
    deriv[i] = (p * (1.0f - p)) * w[i];
  }
}

// dS = σ'(S) ⊙ W ⊙ g: score_grad_slice's "sampled" rule for float32 operands (out may alias g).
MP_ALWAYS_INLINE void sampled_grad_loop(const float* g, const float* __restrict__ w, const float* __restrict__ s,
                                        float* out, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const float v = w[i] * g[i];
    const float p = sigmoid_of(s[i]);
    out[i] = (p * (1.0f - p)) * v;
  }
}

enum class Isa { kBase, kAvx2, kAvx512 };

#if defined(MASKPRUNE_AVX512_MASK_PASS)
// (__restrict__ on the wrappers too, so that the inlined loop keeps its no-alias facts.)
__attribute__((target("avx512f"))) void sampled_mask_avx512(const float* __restrict__ w, const float* __restrict__ s,
                                                             const float* __restrict__ u, float* __restrict__ out,
                                                             float* __restrict__ deriv, int64_t begin, int64_t end) {
  sampled_mask_loop(w, s, u, out, deriv, begin, end);
}
__attribute__((target("avx2"))) void sampled_mask_avx2(const float* __restrict__ w, const float* __restrict__ s,
                                                       const float* __restrict__ u, float* __restrict__ out,
                                                       float* __restrict__ deriv, int64_t begin, int64_t end) {
  sampled_mask_loop(w, s, u, out, deriv, begin, end);
}
__attribute__((target("avx512f"))) void sampled_grad_avx512(const float* g, const float* __restrict__ w,
                                                             const float* __restrict__ s, float* out, int64_t begin,
                                                             int64_t end) {
  sampled_grad_loop(g, w, s, out, begin, end);
}
__attribute__((target("avx2"))) void sampled_grad_avx2(const float* g, const float* __restrict__ w,
                                                       const float* __restrict__ s, float* out, int64_t begin,
                                                       int64_t end) {
  sampled_grad_loop(g, w, s, out, begin, end);
}

// AVX-512F where avx512::enabled() (the CPU has it, MASKPRUNE_NO_AVX512 unset), else AVX2 where the CPU has it
// and MASKPRUNE_NO_AVX2 is unset (or "0"), else the baseline build; decided once.
Isa sampled_isa() {
  static const Isa isa = [] {
    if (avx512::enabled()) return Isa::kAvx512;
    const char* off = std::getenv("MASKPRUNE_NO_AVX2");
    const bool allowed = off == nullptr || off[0] == '\0' || std::strcmp(off, "0") == 0;
    return __builtin_cpu_supports("avx2") && allowed ? Isa::kAvx2 : Isa::kBase;
  }();
  return isa;
}
#else
Isa sampled_isa() { return Isa::kBase; }
#endif

void sampled_mask_f32(const float* __restrict__ w, const float* __restrict__ s, const float* __restrict__ u,
                      float* __restrict__ out, float* __restrict__ deriv, int64_t begin, int64_t end) {
#if defined(MASKPRUNE_AVX512_MASK_PASS)
  switch (sampled_isa()) {
    case Isa::kAvx512: return sampled_mask_avx512(w, s, u, out, deriv, begin, end);
    case Isa::kAvx2: return sampled_mask_avx2(w, s, u, out, deriv, begin, end);
    case Isa::kBase: break;
  }
#endif
  sampled_mask_loop(w, s, u, out, deriv, begin, end);
}

void sampled_grad_f32(const float* g, const float* __restrict__ w, const float* __restrict__ s, float* out,
                      int64_t begin, int64_t end) {
#if defined(MASKPRUNE_AVX512_MASK_PASS)
  switch (sampled_isa()) {
    case Isa::kAvx512: return sampled_grad_avx512(g, w, s, out, begin, end);
    case Isa::kAvx2: return sampled_grad_avx2(g, w, s, out, begin, end);
    case Isa::kBase: break;
  }
#endif
  sampled_grad_loop(g, w, s, out, begin, end);
}

template <typename T>
inline T sign_value(T v) {
  return static_cast<T>((v > T(0) ? 1 : 0) - (v < T(0) ? 1 : 0));
}

// W ⊙ M and the biprop sums, in the product type of the existing mask passes (double when either side is).
template <typename weight_t, typename out_t>
using acc_type = std::conditional_t<std::is_same_v<weight_t, double> || std::is_same_v<out_t, double>, double, float>;

// One slice of the mask pass. For kBinary, *l1 and *kept receive Σ|W|·M and Σ M over the slice (summed in
// blocks of 256 in the accumulation type, then in double, so that the loop still vectorises).
template <Mode kMode, typename score_t, typename weight_t, typename out_t>
void mask_slice(const weight_t* __restrict__ w, const score_t* __restrict__ s, const score_t* __restrict__ u,
                out_t* __restrict__ out, score_t* __restrict__ deriv, score_t thr, int64_t begin, int64_t end,
                double* l1, int64_t* kept) {
  using acc_t = acc_type<weight_t, out_t>;
  if constexpr (kMode == Mode::kBinary) {
    // per-lane partial sums (a float reduction vectorises only when written per lane), moved into double every
    // kFlush elements so that the float error stays that of a short sum
    constexpr int kLanes = 16;
    constexpr int64_t kFlush = 1024;
    acc_t lane[kLanes] = {};
    int32_t count[kLanes] = {};
    double total = 0.0;
    int64_t kept_total = 0;
    auto flush = [&] {
      for (int j = 0; j < kLanes; ++j) {
        total += static_cast<double>(lane[j]);
        kept_total += count[j];
        lane[j] = acc_t(0);
        count[j] = 0;
      }
    };
    int64_t i = begin;
    for (int64_t since = 0; i + kLanes <= end; i += kLanes) {
      for (int j = 0; j < kLanes; ++j) {
        const acc_t keep = std::abs(s[i + j]) >= thr ? acc_t(1) : acc_t(0);
        const acc_t wi = static_cast<acc_t>(w[i + j]);
        out[i + j] = static_cast<out_t>(sign_value(wi) * keep);
        lane[j] += std::abs(wi) * keep;
        count[j] += std::abs(s[i + j]) >= thr ? 1 : 0;
      }
      if ((since += kLanes) >= kFlush) {
        flush();
        since = 0;
      }
    }
    for (; i < end; ++i) {
      const acc_t keep = std::abs(s[i]) >= thr ? acc_t(1) : acc_t(0);
      const acc_t wi = static_cast<acc_t>(w[i]);
      out[i] = static_cast<out_t>(sign_value(wi) * keep);
      lane[0] += std::abs(wi) * keep;
      count[0] += std::abs(s[i]) >= thr ? 1 : 0;
    }
    flush();
    *l1 += total;
    *kept += kept_total;
  } else if constexpr (kMode == Mode::kSampled) {
    // σ(S) once: the mask u < σ(S), and D = σ'(S) ⊙ W for the backward (whose dS is then D ⊙ g, no exp again)
    if constexpr (std::is_same_v<score_t, float> && std::is_same_v<weight_t, float> && std::is_same_v<out_t, float>) {
      sampled_mask_f32(w, s, u, out, deriv, begin, end);
      return;
    }
    for (int64_t i = begin; i < end; ++i) {
      const score_t p = sigmoid_of(s[i]);
      const acc_t keep = u[i] < p ? acc_t(1) : acc_t(0);
      out[i] = static_cast<out_t>(static_cast<acc_t>(w[i]) * keep);
      deriv[i] = (p * (score_t(1) - p)) * static_cast<score_t>(w[i]);
    }
  } else {
    for (int64_t i = begin; i < end; ++i) {
      acc_t keep;
      if constexpr (kMode == Mode::kTopK || kMode == Mode::kSigned) {
        keep = std::abs(s[i]) >= thr ? acc_t(1) : acc_t(0);
      } else {
        keep = s[i] >= thr ? acc_t(1) : acc_t(0);
      }
      if constexpr (kMode == Mode::kSigned) keep *= static_cast<acc_t>(sign_value(s[i]));
      out[i] = static_cast<out_t>(static_cast<acc_t>(w[i]) * keep);
    }
  }
}

template <typename score_t, typename weight_t, typename out_t>
void mask_dispatch(Mode mode, const weight_t* w, const score_t* s, const score_t* u, out_t* out, score_t* deriv,
                   score_t thr, int64_t begin, int64_t end, double* l1, int64_t* kept) {
  switch (mode) {
    case Mode::kTopK: return mask_slice<Mode::kTopK>(w, s, u, out, deriv, thr, begin, end, l1, kept);
    case Mode::kRaw: return mask_slice<Mode::kRaw>(w, s, u, out, deriv, thr, begin, end, l1, kept);
    case Mode::kSigned: return mask_slice<Mode::kSigned>(w, s, u, out, deriv, thr, begin, end, l1, kept);
    case Mode::kBinary: return mask_slice<Mode::kBinary>(w, s, u, out, deriv, thr, begin, end, l1, kept);
    case Mode::kSampled: return mask_slice<Mode::kSampled>(w, s, u, out, deriv, thr, begin, end, l1, kept);
  }
}

// (Q, α, D) on CPU: Q = W_eff / α written in one pass in `dtype` (default the weight's), α a 0-d tensor, and for
// "sampled" D = σ'(S) ⊙ W (the scores' dtype) written by the same pass (else an empty tensor).
std::tuple<at::Tensor, at::Tensor, at::Tensor> policy_mask_cpu(const at::Tensor& weight, const at::Tensor& scores,
                                                   const at::Tensor& t, c10::string_view mode_name,
                                                   const std::optional<at::Tensor>& u,
                                                   std::optional<at::ScalarType> dtype) {
  const Mode mode = parse_mode(mode_name);
  check_policy_mask_args(weight, scores, t, mode, u);
  check_cpu(weight, "weight");
  const auto w = weight.contiguous();
  const auto s = scores.contiguous();
  // u in the scores' dtype: the compare u < σ(S) is made there (as the reference does)
  // (cast only when needed: aten::to hands back its input for the same dtype, which opcheck flags)
  const at::Tensor uc = mode != Mode::kSampled                     ? at::Tensor()
                        : u->scalar_type() == s.scalar_type() ? u->contiguous()
                                                              : u->to(s.scalar_type()).contiguous();
  auto out = pooled_empty(weight.sizes(), weight.options().dtype(dtype.value_or(weight.scalar_type())));
  auto deriv = mode == Mode::kSampled ? pooled_empty(scores.sizes(), scores.options()) : at::empty({0}, scores.options());
  const int64_t n = s.numel();
  const int threads = at::get_num_threads();
  std::vector<double> l1(threads, 0.0);
  std::vector<int64_t> kept(threads, 0);
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "maskprune_policy_mask_scores", [&] {
    using score_t = scalar_t;
    const score_t thr = t.item<score_t>();
    const score_t* sp = s.data_ptr<score_t>();
    const score_t* up = uc.defined() ? uc.data_ptr<score_t>() : nullptr;
    score_t* dp = mode == Mode::kSampled ? deriv.data_ptr<score_t>() : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "maskprune_policy_mask_w", [&] {
      using weight_t = scalar_t;
      const weight_t* wp = w.data_ptr<weight_t>();
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "maskprune_policy_mask_out", [&] {
        scalar_t* op = out.data_ptr<scalar_t>();
        at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
          const int tid = at::get_thread_num();
          mask_dispatch<score_t, weight_t, scalar_t>(mode, wp, sp, up, op, dp, thr, begin, end, &l1[tid],
                                                     &kept[tid]);
        });
      });
    });
  });
  double alpha = 1.0;
  if (mode == Mode::kBinary) {
    double total = 0.0;
    int64_t count = 0;
    for (int i = 0; i < threads; ++i) {
      total += l1[i];
      count += kept[i];
    }
    alpha = total / static_cast<double>(std::max<int64_t>(count, 1));
  }
  return {out, at::scalar_tensor(alpha, at::TensorOptions().dtype(policy_alpha_dtype(weight))), deriv};
}

// dS = factor(S) ⊙ W ⊙ g into `out` (scores' dtype, contiguous; may alias g when the dtypes match).
template <Mode kMode, typename score_t, typename weight_t, typename grad_t>
void score_grad_slice(const grad_t* g, const weight_t* __restrict__ w, const score_t* __restrict__ s, score_t* out,
                      int64_t begin, int64_t end) {
  if constexpr (kMode == Mode::kSampled && std::is_same_v<score_t, float> && std::is_same_v<weight_t, float> &&
                std::is_same_v<grad_t, float>) {
    sampled_grad_f32(g, w, s, out, begin, end);
    return;
  }
  for (int64_t i = begin; i < end; ++i) {
    const score_t v = static_cast<score_t>(w[i]) * static_cast<score_t>(g[i]);
    if constexpr (kMode == Mode::kTopK || kMode == Mode::kBinary) {
      out[i] = sign_value(s[i]) * v;
    } else if constexpr (kMode == Mode::kSampled) {
      const score_t p = sigmoid_of(s[i]);
      out[i] = (p * (score_t(1) - p)) * v;
    } else {
      out[i] = v;
    }
  }
}

void score_grad_into(Mode mode, const at::Tensor& g, const at::Tensor& w, const at::Tensor& s, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "maskprune_policy_score_grad", [&] {
    using score_t = scalar_t;
    const score_t* sp = s.data_ptr<score_t>();
    score_t* op = out.data_ptr<score_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "maskprune_policy_score_grad_w", [&] {
      using weight_t = scalar_t;
      const weight_t* wp = w.data_ptr<weight_t>();
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "maskprune_policy_score_grad_g", [&] {
        const scalar_t* gp = g.data_ptr<scalar_t>();
        at::parallel_for(0, s.numel(), kGrain, [&](int64_t begin, int64_t end) {
          switch (mode) {
            case Mode::kTopK:
            case Mode::kBinary:
              return score_grad_slice<Mode::kTopK, score_t, weight_t, scalar_t>(gp, wp, sp, op, begin, end);
            case Mode::kRaw:
            case Mode::kSigned:
              return score_grad_slice<Mode::kRaw, score_t, weight_t, scalar_t>(gp, wp, sp, op, begin, end);
            case Mode::kSampled:
              return score_grad_slice<Mode::kSampled, score_t, weight_t, scalar_t>(gp, wp, sp, op, begin, end);
          }
        });
      });
    });
  });
}

at::Tensor policy_score_grad_cpu(const at::Tensor& grad_weight, const at::Tensor& weight, const at::Tensor& scores,
                                 c10::string_view mode_name, const std::optional<at::Tensor>& u) {
  const Mode mode = parse_mode(mode_name);
  check_score_grad_args(grad_weight, weight, scores);
  check_policy_u(mode, u, scores);
  check_cpu(scores, "scores");
  const auto s = scores.contiguous();
  auto out = at::empty_like(s);
  score_grad_into(mode, grad_weight.contiguous(), weight.contiguous(), s, out);
  return out;
}

// dS of policy_masked_linear from its output gradient: the weight-gradient GEMM gᵀX into a cached buffer, then
// the score-gradient pass over it in place (the buffer becomes the scores' .grad).
at::Tensor policy_linear_score_grad_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                        const at::Tensor& scores, c10::string_view mode_name,
                                        const std::optional<at::Tensor>& u) {
  const Mode mode = parse_mode(mode_name);
  check_policy_linear_grad_args(grad_out, x, weight, scores, mode, u);
  check_cpu(x, "x");
  const auto s = scores.contiguous();
  auto grad_weight = linear_weight_grad(grad_out, x, weight.size(0), weight.size(1));
  auto out = x.scalar_type() == s.scalar_type() ? grad_weight : at::empty_like(s);
  score_grad_into(mode, grad_weight, weight.contiguous(), s, out);
  return out;
}

// ---- device-generic composites over the ops above (through the dispatcher) ----

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_policy_mask(const at::Tensor& weight, const at::Tensor& scores,
                                                                const at::Tensor& t, c10::string_view mode,
                                                                const std::optional<at::Tensor>& u,
                                                                std::optional<at::ScalarType> dtype) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("maskprune::policy_mask", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, c10::string_view,
                                                                 const std::optional<at::Tensor>&,
                                                                 std::optional<at::ScalarType>)>();
  return op.call(weight, scores, t, mode, u, dtype);
}

at::Tensor call_policy_score_grad(const at::Tensor& grad_weight, const at::Tensor& weight, const at::Tensor& scores,
                                  c10::string_view mode, const std::optional<at::Tensor>& u) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("maskprune::policy_score_grad", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::string_view,
                                         const std::optional<at::Tensor>&)>();
  return op.call(grad_weight, weight, scores, mode, u);
}

at::Tensor call_policy_linear_score_grad(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                         const at::Tensor& scores, c10::string_view mode,
                                         const std::optional<at::Tensor>& u) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("maskprune::policy_linear_score_grad", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         c10::string_view, const std::optional<at::Tensor>&)>();
  return op.call(grad_out, x, weight, scores, mode, u);
}

// W_eff = α Q (the scale applied in place to Q, a tensor of this call; only "binary" has α != 1).
at::Tensor policy_apply_mask(const at::Tensor& weight, const at::Tensor& scores, const at::Tensor& t,
                             c10::string_view mode, const std::optional<at::Tensor>& u,
                             std::optional<at::ScalarType> dtype) {
  auto [q, alpha, deriv] = call_policy_mask(weight, scores, t, mode, u, dtype);
  if (parse_mode(mode) == Mode::kBinary) q.mul_(cast_to(alpha, q.scalar_type()));
  return q;
}

// (Y, Q, α, D): Y = α · X Qᵀ (+ b) in x's dtype, α applied to the GEMM's output; D as policy_mask's.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> policy_linear_keeping_weight(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scores, const at::Tensor& t,
    const std::optional<at::Tensor>& bias, c10::string_view mode, const std::optional<at::Tensor>& u) {
  check_linear_args(x, weight, scores, t);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) check_linear_bias(*bias, weight);
  auto [q, alpha, deriv] = call_policy_mask(weight, scores, t, mode, u, x.scalar_type());
  at::Tensor y;
  if (parse_mode(mode) == Mode::kBinary) {
    y = at::linear(x, q);
    y.mul_(cast_to(alpha, x.scalar_type()));
    if (has_bias) y.add_(cast_to(*bias, x.scalar_type()));
  } else {
    std::optional<at::Tensor> b;
    if (has_bias) b = cast_to(*bias, x.scalar_type());
    y = at::linear(x, q, b);
  }
  return {std::move(y), std::move(q), std::move(alpha), std::move(deriv)};
}

at::Tensor policy_masked_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scores,
                                const at::Tensor& t, const std::optional<at::Tensor>& bias, c10::string_view mode,
                                const std::optional<at::Tensor>& u) {
  return std::get<0>(policy_linear_keeping_weight(x, weight, scores, t, bias, mode, u));
}

// ---- autograd (in C++: no Python per layer and step) ----

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::optional<at::Tensor> optional_of(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

struct PolicyMaskFunction : public torch::autograd::Function<PolicyMaskFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& weight, const at::Tensor& scores,
                            const at::Tensor& t, const std::optional<at::Tensor>& u, std::string mode,
                            std::optional<at::ScalarType> dtype) {
    ctx->save_for_backward({weight, scores, u.has_value() ? *u : at::Tensor()});
    ctx->saved_data["mode"] = mode;
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("maskprune::policy_apply_mask", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::string_view,
                                           const std::optional<at::Tensor>&, std::optional<at::ScalarType>)>();
    return op.call(weight, scores, t, mode, u, dtype);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    at::Tensor grad_scores;
    if (ctx->needs_input_grad(1) && grads[0].defined()) {
      grad_scores = call_policy_score_grad(grads[0], saved[0], saved[1], ctx->saved_data["mode"].toStringRef(),
                                           optional_of(saved[2]));
    }
    return {at::Tensor(), grad_scores, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// Arguments (x, weight, scores, t, bias, u, mode): x, scores and bias are the tensor inputs 0, 2 and 4.
struct PolicyLinearFunction : public torch::autograd::Function<PolicyLinearFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& scores, const at::Tensor& t, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& u, std::string mode) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, q, alpha, deriv] = policy_linear_keeping_weight(x, weight, scores, t, bias, mode, u);
    const bool has_bias = bias.has_value() && bias->defined();
    ctx->saved_data["mode"] = mode;
    ctx->saved_data["has_bias"] = has_bias;
    if (has_bias) ctx->saved_data["bias_dtype"] = bias->scalar_type();
    ctx->save_for_backward({x, weight, scores, u.has_value() ? *u : at::Tensor(), q, alpha, deriv});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &scores = saved[2], &q = saved[4], &alpha = saved[5];
    const auto& grad = grads[0];
    at::Tensor grad_x, grad_scores, grad_bias;
    if (grad.defined()) {
      const auto mode = ctx->saved_data["mode"].toStringRef();
      const auto g = cast_to(grad, x.scalar_type());
      if (ctx->needs_input_grad(0)) {
        grad_x = at::matmul(g, q);
        if (parse_mode(mode) == Mode::kBinary) grad_x.mul_(cast_to(alpha, x.scalar_type()));
      }
      if (ctx->needs_input_grad(2)) {
        if (parse_mode(mode) == Mode::kSampled) {  // dS = D ⊙ (gᵀX) with D = σ'(S) ⊙ W from the forward
          grad_scores = call_policy_linear_score_grad(g, x, saved[6], scores, "raw", std::nullopt);
        } else {
          grad_scores = call_policy_linear_score_grad(g, x, weight, scores, mode, optional_of(saved[3]));
        }
      }
      if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(4)) {
        grad_bias = grad.reshape({-1, grad.size(-1)}).sum(0).to(ctx->saved_data["bias_dtype"].toScalarType());
      }
    }
    return {grad_x, at::Tensor(), grad_scores, at::Tensor(), grad_bias, at::Tensor(), at::Tensor()};
  }
};

at::Tensor policy_apply_mask_autograd(const at::Tensor& weight, const at::Tensor& scores, const at::Tensor& t,
                                      c10::string_view mode, const std::optional<at::Tensor>& u,
                                      std::optional<at::ScalarType> dtype) {
  return PolicyMaskFunction::apply(weight, scores, t, u, std::string(mode), dtype);
}

at::Tensor policy_masked_linear_autograd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scores,
                                         const at::Tensor& t, const std::optional<at::Tensor>& bias,
                                         c10::string_view mode, const std::optional<at::Tensor>& u) {
  return PolicyLinearFunction::apply(x, weight, scores, t, bias, u, std::string(mode));
}

}  // namespace

TORCH_LIBRARY_IMPL(maskprune, CPU, m) {
  m.impl("policy_mask", &policy_mask_cpu);
  m.impl("policy_score_grad", &policy_score_grad_cpu);
  m.impl("policy_linear_score_grad", &policy_linear_score_grad_cpu);
}

TORCH_LIBRARY_IMPL(maskprune, CompositeExplicitAutograd, m) {
  m.impl("policy_apply_mask", &policy_apply_mask);
  m.impl("policy_masked_linear", &policy_masked_linear);
}

TORCH_LIBRARY_IMPL(maskprune, Autograd, m) {
  m.impl("policy_apply_mask", &policy_apply_mask_autograd);
  m.impl("policy_masked_linear", &policy_masked_linear_autograd);
}

}  // namespace maskprune
