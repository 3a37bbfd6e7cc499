// Argument checks of the counter_weights_ op, shared by its CPU (cpu/rng_ops.cpp) and CUDA
// (cuda/rng_ops.cu) kernels: the messages name the argument and what it accepts.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <cstdint>

#include "philox.h"

namespace maskprune {

struct CounterArgs {
  philox::Dist dist;
  float step;      // philox::dist_step(dist, float32(scale))
  uint64_t seed;   // the 64-bit seed (the op's int64 `seed` is its two's-complement bits)
  uint32_t layer, stream;
  uint64_t offset; // element index of out's first element
};

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

}  // namespace maskprune
