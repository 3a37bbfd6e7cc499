// masked_linear's device-generic pieces (masked_linear.cpp), shared by its composite kernels and the
// autograd of apply_mask and masked_linear (autograd.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <utility>

namespace maskprune {

// The apply_mask and score_grad ops, called through the dispatcher (so that each device's kernel runs).
at::Tensor call_apply_mask(const at::Tensor& weight, const at::Tensor& scores, const at::Tensor& t,
                           bool abs_scores, std::optional<at::ScalarType> dtype);
at::Tensor call_score_grad(const at::Tensor& grad_weight, const at::Tensor& weight, const at::Tensor& scores,
                           bool abs_scores);

// (Y, W ⊙ M): the fused mask pass (in x's dtype) and the platform GEMM; W ⊙ M is returned too, so that
// autograd can keep it for dX instead of masking again in the backward.
std::pair<at::Tensor, at::Tensor> masked_linear_keeping_weight(const at::Tensor& x, const at::Tensor& weight,
                                                               const at::Tensor& scores, const at::Tensor& t,
                                                               const std::optional<at::Tensor>& bias,
                                                               bool abs_scores);

}  // namespace maskprune
