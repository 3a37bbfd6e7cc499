// The mask policies' modes and argument checks, shared by the CPU passes (cpu/policy_ops.cpp) and the CUDA
// kernels (cuda/policy_ops.cu) of policy_mask / policy_score_grad / policy_linear_score_grad (schemas in ops.cpp).
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <string>

#include "checks.h"

namespace maskprune {

// The rule of a mask policy (maskprune.ops.POLICY_MODES; maskprune.reference.policy_* is the oracle).
enum class PolicyMode : int { kTopK = 0, kRaw = 1, kSigned = 2, kBinary = 3, kSampled = 4 };

inline PolicyMode parse_policy_mode(c10::string_view mode) {
  if (mode == "topk") return PolicyMode::kTopK;
  if (mode == "raw") return PolicyMode::kRaw;
  if (mode == "signed") return PolicyMode::kSigned;
  if (mode == "binary") return PolicyMode::kBinary;
  if (mode == "sampled") return PolicyMode::kSampled;
  TORCH_CHECK_VALUE(false, "mode must be one of topk, raw, signed, binary, sampled, got '", std::string(mode), "'");
  return PolicyMode::kTopK;  // not reached
}

// u: given exactly for "sampled", a float32/float64 tensor of the scores' shape on their device.
inline void check_policy_u(PolicyMode mode, const std::optional<at::Tensor>& u, const at::Tensor& scores) {
  const bool given = u.has_value() && u->defined();
  if (mode != PolicyMode::kSampled) {
    TORCH_CHECK_VALUE(!given, "u is only taken by mode 'sampled'");
    return;
  }
  TORCH_CHECK_VALUE(given, "mode 'sampled' needs u (uniform draws in [0, 1) of the scores' shape)");
  TORCH_CHECK_TYPE(u->scalar_type() == at::kFloat || u->scalar_type() == at::kDouble,
                   "u must be float32 or float64, got ", u->scalar_type());
  TORCH_CHECK_VALUE(u->sizes() == scores.sizes(), "u must have the scores' shape ", scores.sizes(), ", got ",
                    u->sizes());
  check_same_device(*u, "u", scores, "scores");
}

inline void check_policy_mask_args(const at::Tensor& weight, const at::Tensor& scores, const at::Tensor& t,
                                   PolicyMode mode, const std::optional<at::Tensor>& u) {
  check_mask_args(weight, scores, t);
  check_policy_u(mode, u, scores);
}

// The arguments of policy_linear_score_grad: grad_out and x of a linear layer over (weight, scores).
inline void check_policy_linear_grad_args(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                          const at::Tensor& scores, PolicyMode mode,
                                          const std::optional<at::Tensor>& u) {
  check_float(weight, "weight");
  check_scores(scores);
  TORCH_CHECK_VALUE(weight.sizes() == scores.sizes(), "scores must have the weight's shape ", weight.sizes(),
                    ", got ", scores.sizes());
  check_same_device(weight, "weight", scores, "scores");
  check_linear_shapes(x, weight);
  check_linear_grad_out(grad_out, x, weight);
  check_policy_u(mode, u, scores);
}

// The dtype of α: the weight's, promoted to at least float32 (as maskprune.reference computes it).
inline at::ScalarType policy_alpha_dtype(const at::Tensor& weight) {
  return at::promote_types(weight.scalar_type(), at::kFloat);
}

// t in `dtype`, cast only when needed: aten::to hands back its input for the same dtype, and an operator below
// autograd must not return (an alias of) an input (opcheck).
inline at::Tensor cast_to(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

}  // namespace maskprune
