// masked_linear's device-generic pieces, shared by its composite kernels (masked_linear.cpp) and its
// autograd (autograd.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <utility>

namespace maskprune {

// (Y, W ⊙ M): the fused mask pass (in x's dtype) and the platform GEMM; W ⊙ M is returned too, so that
// autograd can keep it for dX instead of masking again in the backward.
std::pair<at::Tensor, at::Tensor> masked_linear_keeping_weight(const at::Tensor& x, const at::Tensor& weight,
                                                               const at::Tensor& scores, const at::Tensor& t,
                                                               const std::optional<at::Tensor>& bias,
                                                               bool abs_scores);

}  // namespace maskprune
