// Input checks and numeric helpers shared by the CPU and CUDA implementations.
#pragma once
#include <ATen/ATen.h>
#include <cmath>
#include <cstdint>
#include <optional>

namespace maskprune {

#if defined(__CUDACC__)
#define MP_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MP_HOST_DEVICE inline
#endif

// Whether p is aligned to `bytes` (a power of two): the vector stores of the CPU mask passes need it.
inline bool is_aligned(const void* p, uintptr_t bytes) { return (reinterpret_cast<uintptr_t>(p) & (bytes - 1)) == 0; }

// Number of kept entries for a density k in (0, 1]: rounded so float error in k*n never flips a weight.
inline int64_t n_keep_for(double density, int64_t n) {
  TORCH_CHECK_VALUE(std::isfinite(density) && density > 0.0 && density <= 1.0,
                    "density must be in (0, 1], got ", density);
  TORCH_CHECK_VALUE(n > 0, "scores must have at least one element");
  int64_t keep = static_cast<int64_t>(std::floor(density * static_cast<double>(n) + 0.5));
  return std::min(std::max<int64_t>(keep, 1), n);
}

inline void check_scores(const at::Tensor& scores, const char* name = "scores") {
  TORCH_CHECK_TYPE(scores.scalar_type() == at::kFloat || scores.scalar_type() == at::kDouble,
                   name, " must be float32 or float64, got ", scores.scalar_type());
}

inline void check_float(const at::Tensor& t, const char* name) {
  auto s = t.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16,
                   name, " must be a floating tensor (float16, bfloat16, float32, float64), got ", s);
}

inline void check_same_device(const at::Tensor& a, const char* na, const at::Tensor& b, const char* nb) {
  TORCH_CHECK_VALUE(a.device() == b.device(), na, " and ", nb, " must be on the same device, got ",
                    a.device(), " and ", b.device());
}

inline void check_mask_args(const at::Tensor& weight, const at::Tensor& scores, const at::Tensor& t) {
  check_float(weight, "weight");
  check_scores(scores);
  TORCH_CHECK_VALUE(weight.sizes() == scores.sizes(), "scores must have the weight's shape ",
                    weight.sizes(), ", got ", scores.sizes());
  TORCH_CHECK_VALUE(t.dim() == 0, "t must be a 0-d tensor, got shape ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == scores.scalar_type(), "t must have the scores' dtype ",
                   scores.scalar_type(), ", got ", t.scalar_type());
  check_same_device(weight, "weight", scores, "scores");
  check_same_device(t, "t", scores, "scores");
}

inline void check_score_grad_args(const at::Tensor& grad_weight, const at::Tensor& weight, const at::Tensor& scores) {
  check_float(grad_weight, "grad_weight");
  check_float(weight, "weight");
  check_scores(scores);
  TORCH_CHECK_VALUE(weight.sizes() == scores.sizes() && grad_weight.sizes() == scores.sizes(),
                    "grad_weight, weight and scores must share one shape, got ", grad_weight.sizes(), ", ",
                    weight.sizes(), " and ", scores.sizes());
  check_same_device(grad_weight, "grad_weight", scores, "scores");
  check_same_device(weight, "weight", scores, "scores");
}

// score_grad_ writes dS over grad_weight: it must already have the scores' dtype and be contiguous.
inline void check_score_grad_inplace_args(const at::Tensor& grad_weight, const at::Tensor& weight,
                                          const at::Tensor& scores) {
  check_score_grad_args(grad_weight, weight, scores);
  TORCH_CHECK_TYPE(grad_weight.scalar_type() == scores.scalar_type(), "grad_weight must have the scores' dtype ",
                   scores.scalar_type(), " to take dS in place, got ", grad_weight.scalar_type());
  TORCH_CHECK_VALUE(grad_weight.is_contiguous(), "grad_weight must be contiguous to take dS in place");
}

// A threshold hint: a 0-d floating-point tensor on any device (only a CPU one is read).
inline void check_hint(const std::optional<at::Tensor>& hint) {
  if (!hint.has_value() || !hint->defined()) return;
  check_float(*hint, "hint");
  TORCH_CHECK_VALUE(hint->dim() == 0, "hint must be a 0-d tensor (a previous threshold), got shape ", hint->sizes());
}

// masked_linear and its backward (the composite in masked_linear.cpp and the CUDA kernels).
// x against the weight; masked_linear_topk checks this before a threshold exists.
inline void check_linear_shapes(const at::Tensor& x, const at::Tensor& weight) {
  check_float(x, "x");
  check_same_device(x, "x", weight, "weight");
  TORCH_CHECK_VALUE(weight.dim() == 2, "weight must be 2-D (out_features, in_features), got shape ",
                    weight.sizes());
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == weight.size(1), "x's last dimension must equal in_features=",
                    weight.size(1), ", got shape ", x.sizes());
}

inline void check_linear_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scores,
                              const at::Tensor& t) {
  check_mask_args(weight, scores, t);
  check_linear_shapes(x, weight);
}

inline void check_linear_bias(const at::Tensor& bias, const at::Tensor& weight) {
  check_float(bias, "bias");
  check_same_device(bias, "bias", weight, "weight");
  TORCH_CHECK_VALUE(bias.dim() == 1 && bias.size(0) == weight.size(0),
                    "bias must have shape (out_features=", weight.size(0), ",), got ", bias.sizes());
}

inline void check_linear_grad_out(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight) {
  check_same_device(grad_out, "grad_out", x, "x");
  TORCH_CHECK_VALUE(grad_out.dim() == x.dim() && grad_out.size(-1) == weight.size(0),
                    "grad_out must have shape (..., out_features=", weight.size(0), "), got ", grad_out.sizes());
}

// Order-preserving map from a float's bits to an unsigned integer key: a > b  <=>  key(a) > key(b).
template <typename scalar_t> struct KeyBits;
template <> struct KeyBits<float> {
  using type = uint32_t;
  static constexpr int bits = 32;
  static constexpr type sign = 0x80000000u;
  static constexpr type exponent = 0x7F800000u;
};
template <> struct KeyBits<double> {
  using type = uint64_t;
  static constexpr int bits = 64;
  static constexpr type sign = 0x8000000000000000ull;
  static constexpr type exponent = 0x7FF0000000000000ull;
};

// |x| keys keep the bit pattern with the sign cleared; signed keys flip negatives so they order too.
template <typename U, U kSign>
MP_HOST_DEVICE U encode_key(U raw, bool abs_scores) {
  if (abs_scores) return raw & ~kSign;
  return (raw & kSign) ? ~raw : (raw | kSign);
}

template <typename U, U kSign>
MP_HOST_DEVICE U decode_key(U key, bool abs_scores) {
  if (abs_scores) return key;
  return (key & kSign) ? (key & ~kSign) : ~key;
}

}  // namespace maskprune
