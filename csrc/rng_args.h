// Argument checks of the counter_weights_ op, shared by its CPU (cpu/rng_ops.cpp) and CUDA
// (cuda/rng_ops.cu) kernels: the messages name the argument and what it accepts.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>

#include "philox.h"

namespace maskprune {

struct CounterArgs {
  philox::Dist dist;
  float step;      // philox::dist_step(dist, float32(scale))
  uint64_t seed;   // the 64-bit seed (the op's int64 `seed` is its two's-complement bits)
  uint32_t layer, stream;
  uint64_t offset; // element index of out's first element
};

// Calls f with the distribution as a compile-time constant (std::integral_constant).
template <typename F>
inline void with_dist(philox::Dist dist, F&& f) {
  switch (dist) {
    case philox::Dist::kSignedConstant: return f(std::integral_constant<philox::Dist, philox::Dist::kSignedConstant>{});
    case philox::Dist::kKaimingUniform: return f(std::integral_constant<philox::Dist, philox::Dist::kKaimingUniform>{});
    case philox::Dist::kKaimingNormal: return f(std::integral_constant<philox::Dist, philox::Dist::kKaimingNormal>{});
    case philox::Dist::kUniform: return f(std::integral_constant<philox::Dist, philox::Dist::kUniform>{});
  }
}

inline philox::Dist parse_dist(c10::string_view init) {
  if (init == "signed_constant") return philox::Dist::kSignedConstant;
  if (init == "kaiming_uniform") return philox::Dist::kKaimingUniform;
  if (init == "kaiming_normal") return philox::Dist::kKaimingNormal;
  if (init == "uniform") return philox::Dist::kUniform;
  TORCH_CHECK_VALUE(false, "init must be one of (signed_constant, kaiming_normal, kaiming_uniform, uniform), got '",
                    std::string(init.data(), init.size()), "'");
  return philox::Dist::kUniform;  // unreachable
}

inline CounterArgs check_counter_args(const at::Tensor& out, c10::string_view init, double scale, int64_t seed,
                                      int64_t layer, int64_t stream, int64_t offset) {
  const auto dtype = out.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
                   "out must be a floating tensor (float32, float64, float16, bfloat16), got ", dtype);
  TORCH_CHECK_VALUE(out.is_contiguous(), "out must be contiguous (element i is its i-th in row-major order)");
  const philox::Dist dist = parse_dist(init);
  const float scale32 = static_cast<float>(scale);
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0 && std::isfinite(scale32) && scale32 >= 0x1p-100f,
                    "scale must be a finite float32 >= 2^-100, got ", scale);
  TORCH_CHECK_VALUE(layer >= 0 && layer <= int64_t{0xFFFFFFFF}, "layer must be in [0, 2^32), got ", layer);
  TORCH_CHECK_VALUE(stream >= 0 && stream <= int64_t{0xFFFFFFFF}, "stream must be in [0, 2^32), got ", stream);
  TORCH_CHECK_VALUE(offset >= 0 && offset <= INT64_MAX - out.numel(),
                    "offset must be in [0, 2^63 - numel], got ", offset);
  return {dist, philox::dist_step(dist, scale32), static_cast<uint64_t>(seed), static_cast<uint32_t>(layer),
          static_cast<uint32_t>(stream), static_cast<uint64_t>(offset)};
}

// Seed mode (seed_apply_mask, seed_score_grad_): float32 scores and the weight's key as counter_weights_ takes
// it (stream 0, offset 0; `init` one of the three weight inits).
inline CounterArgs check_seed_key(const at::Tensor& scores, c10::string_view init, double scale, int64_t seed,
                                  int64_t layer) {
  TORCH_CHECK_TYPE(scores.scalar_type() == at::kFloat, "scores must be float32, got ", scores.scalar_type());
  TORCH_CHECK_VALUE(init != "uniform",
                    "init must be one of (signed_constant, kaiming_normal, kaiming_uniform), got 'uniform'");
  return check_counter_args(scores.contiguous(), init, scale, seed, layer, 0, 0);
}

// seed_apply_mask's threshold: a 0-d float32 tensor on the scores' device.
inline void check_seed_threshold(const at::Tensor& scores, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.dim() == 0, "t must be a 0-d tensor, got shape ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, "t must have the scores' dtype float32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == scores.device(), "t and scores must be on the same device, got ", t.device(),
                    " and ", scores.device());
}

// seed_apply_mask's output dtype: `dtype`, default float32, a floating dtype.
inline at::ScalarType seed_out_dtype(std::optional<at::ScalarType> dtype) {
  const auto out_dtype = dtype.value_or(at::kFloat);
  TORCH_CHECK_TYPE(at::isFloatingType(out_dtype), "dtype must be a floating dtype, got ", out_dtype);
  return out_dtype;
}

// seed_score_grad_ writes dS over grad_weight: float32, contiguous, the scores' shape and device.
inline void check_seed_grad(const at::Tensor& grad_weight, const at::Tensor& scores) {
  TORCH_CHECK_TYPE(grad_weight.scalar_type() == at::kFloat,
                   "grad_weight must be float32 (the scores' dtype) to take dS in place, got ",
                   grad_weight.scalar_type());
  TORCH_CHECK_VALUE(grad_weight.sizes() == scores.sizes(), "grad_weight must have the scores' shape ", scores.sizes(),
                    ", got ", grad_weight.sizes());
  TORCH_CHECK_VALUE(grad_weight.is_contiguous(), "grad_weight must be contiguous to take dS in place");
  TORCH_CHECK_VALUE(grad_weight.device() == scores.device(), "grad_weight and scores must be on the same device, got ",
                    grad_weight.device(), " and ", scores.device());
}

}  // namespace maskprune
