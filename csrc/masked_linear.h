// masked_linear's device-generic pieces (masked_linear.cpp), shared by its composite kernels and the
// autograd of apply_mask and masked_linear (autograd.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <utility>

namespace maskprune {

// The apply_mask and score_grad ops, called through the dispatcher (so that each device's kernel runs).
at::Tensor call_apply_mask(const at::Tensor& weight, const at::Tensor& scores, const at::Tensor& t,
                           bool abs_scores, std::optional<at::ScalarType> dtype);
at::Tensor call_score_grad(const at::Tensor& grad_weight, const at::Tensor& weight, const at::Tensor& scores,
                           bool abs_scores);
// gᵀX of a linear layer in x's dtype (on CPU in the buffer cache), for a score-gradient pass to finish in place.
at::Tensor linear_weight_grad(const at::Tensor& grad_out, const at::Tensor& x, int64_t out_features,
                              int64_t in_features);

// The threshold, threshold_and_mask and masked_linear ops, called through the dispatcher.
at::Tensor call_threshold(const at::Tensor& scores, double density, bool abs_scores,
                          const std::optional<at::Tensor>& hint);
std::tuple<at::Tensor, at::Tensor> call_threshold_and_mask(const at::Tensor& weight, const at::Tensor& scores,
                                                           double density, bool abs_scores,
                                                           const std::optional<at::Tensor>& hint,
                                                           std::optional<at::ScalarType> dtype);
at::Tensor call_masked_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scores,
                              const at::Tensor& t, const std::optional<at::Tensor>& bias, bool abs_scores);

// (Y, W ⊙ M): the fused mask pass (in x's dtype) and the platform GEMM; W ⊙ M is returned too, so that
// autograd can keep it for dX instead of masking again in the backward.
std::pair<at::Tensor, at::Tensor> masked_linear_keeping_weight(const at::Tensor& x, const at::Tensor& weight,
                                                               const at::Tensor& scores, const at::Tensor& t,
                                                               const std::optional<at::Tensor>& bias,
                                                               bool abs_scores);

// (Y, t, W ⊙ M) with t the layer-wise threshold, found in the same pass over the scores as W ⊙ M where
// the device has a fused kernel (threshold_and_mask). With `signs` non-null, where the backward can use
// them (CPU, abs_scores, float32 x and scores), *signs receives the scores' packed sign bytes
// (threshold_and_mask_signs); elsewhere it is left undefined.
std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_linear_topk_keeping_weight(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scores, double density,
    const std::optional<at::Tensor>& bias, bool abs_scores, const std::optional<at::Tensor>& hint,
    at::Tensor* signs = nullptr);

// masked_linear_topk below autograd (e.g. under inference_mode): (Y, t). On CPU threshold_and_mask + GEMM,
// elsewhere the threshold and masked_linear ops (a device may register its own masked_linear).
std::tuple<at::Tensor, at::Tensor> masked_linear_topk(const at::Tensor& x, const at::Tensor& weight,
                                                      const at::Tensor& scores, double density,
                                                      const std::optional<at::Tensor>& bias, bool abs_scores,
                                                      const std::optional<at::Tensor>& hint);

}  // namespace maskprune
