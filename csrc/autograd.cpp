// Autograd of apply_mask, masked_linear and masked_linear_topk, in C++ rather than through torch.library.register_autograd
// so that a masked layer's training step pays no Python for it (~40 us per layer and step on CPU).
// The straight-through estimator: dS = sign(S) * W * dW_eff (W * dW_eff when abs_scores is false),
// and no gradient to the weight or t.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "masked_linear.h"

namespace maskprune {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct StraightThroughMask : public torch::autograd::Function<StraightThroughMask> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& weight, const at::Tensor& scores,
                            const at::Tensor& t, bool abs_scores, std::optional<at::ScalarType> dtype) {
    ctx->save_for_backward({weight, scores});
    ctx->saved_data["abs_scores"] = abs_scores;
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_apply_mask(weight, scores, t, abs_scores, dtype);
  }

  // dS in a new tensor: the incoming gradient may belong to the caller (apply_mask is public).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    at::Tensor grad_scores;
    if (ctx->needs_input_grad(1) && grads[0].defined()) {
      grad_scores = call_score_grad(grads[0], saved[0], saved[1], ctx->saved_data["abs_scores"].toBool());
    }
    return {at::Tensor(), grad_scores, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

using BackwardOp = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                      const at::Tensor&, const at::Tensor&, bool, bool, bool,
                                                      const std::optional<at::Tensor>&);

// What both masked_linear functions save: settings in saved_data, tensors (x, weight, scores, t, W ⊙ M or
// an undefined tensor where the forward did not keep it, the scores' sign bytes or an undefined tensor where
// the forward did not pack them).
void save_linear(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scores,
                 const at::Tensor& t, const at::Tensor& w_eff, const std::optional<at::Tensor>& bias,
                 bool abs_scores, const at::Tensor& signs = at::Tensor()) {
  const bool has_bias = bias.has_value() && bias->defined();
  ctx->saved_data["abs_scores"] = abs_scores;
  ctx->saved_data["has_bias"] = has_bias;
  if (has_bias) ctx->saved_data["bias_dtype"] = bias->scalar_type();
  ctx->save_for_backward({x, weight, scores, t, w_eff, signs});
}

// (dX, dS, dBias) of a masked linear layer. needs_input_grad counts the tensor arguments given (an
// empty optional is none): x and scores are the first and third, bias the `bias_edge`-th from 0.
// With W ⊙ M kept (CPU) dX is one GEMM on it; dS is written over the weight-gradient GEMM's output, a
// tensor only this backward holds (inside masked_linear_backward).
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_grads(AutogradContext* ctx, const at::Tensor& grad,
                                                            size_t bias_edge) {
  static auto backward_op = c10::Dispatcher::singleton()
                                .findSchemaOrThrow("maskprune::masked_linear_backward", "")
                                .typed<BackwardOp>();
  const auto saved = ctx->get_saved_variables();
  const at::Tensor &x = saved[0], &weight = saved[1], &scores = saved[2], &t = saved[3], &w_eff = saved[4];
  const bool has_bias = ctx->saved_data["has_bias"].toBool();
  const bool need_x = ctx->needs_input_grad(0), need_scores = ctx->needs_input_grad(2);
  const bool need_bias = has_bias && ctx->needs_input_grad(bias_edge);
  at::Tensor grad_x, grad_scores, grad_bias;
  if (!grad.defined()) return {grad_x, grad_scores, grad_bias};
  const bool kept = w_eff.defined();
  if ((need_x && !kept) || need_scores) {
    const std::optional<at::Tensor> signs = saved[5].defined() ? std::optional<at::Tensor>(saved[5]) : std::nullopt;
    std::tie(grad_x, grad_scores) = backward_op.call(grad, x, weight, scores, t,
                                                     ctx->saved_data["abs_scores"].toBool(), need_x && !kept,
                                                     need_scores, signs);
  }
  if (need_x && kept) grad_x = at::matmul(grad.to(x.scalar_type()), w_eff);
  if (!need_x) grad_x = at::Tensor();  // the op returns empty tensors for what was not asked
  if (!need_scores) grad_scores = at::Tensor();
  if (need_bias) {
    grad_bias = grad.reshape({-1, grad.size(-1)}).sum(0).to(ctx->saved_data["bias_dtype"].toScalarType());
  }
  return {grad_x, grad_scores, grad_bias};
}

// masked_linear(x, weight, scores, t, bias, abs_scores). The forward keeps W ⊙ M for dX (one mask pass per
// step, not two), on CPU and CUDA alike.
struct MaskedLinearFunction : public torch::autograd::Function<MaskedLinearFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& scores, const at::Tensor& t, const std::optional<at::Tensor>& bias,
                            bool abs_scores) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    // On every device: the mask pass builds W ⊙ M once, the platform GEMM (MKL/oneDNN, cuBLAS) runs on
    // it, and the backward's dX reuses it (docs/design.md §3: the mask once per step).
    auto [y, w_eff] = masked_linear_keeping_weight(x, weight, scores, t, bias, abs_scores);
    save_linear(ctx, x, weight, scores, t, w_eff, bias, abs_scores);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto [grad_x, grad_scores, grad_bias] = linear_grads(ctx, grads[0], /*bias_edge=*/4);
    return {grad_x, at::Tensor(), grad_scores, at::Tensor(), grad_bias, at::Tensor()};
  }
};

// masked_linear_topk -> (Y, t): the same layer, its threshold found in the forward (on CPU in the mask
// pass itself); t carries no gradient. Arguments: (x, weight, scores, bias, hint, density, abs_scores),
// the optional tensors last so that bias, when given, is always the fourth tensor. `with_signs`: whether the
// backward will want dS (on CPU the forward then packs the scores' sign bytes for it).
struct MaskedLinearTopKFunction : public torch::autograd::Function<MaskedLinearTopKFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& scores, const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& hint, double density, bool abs_scores,
                               bool with_signs) {
    at::Tensor y, t;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      at::Tensor w_eff, signs;  // signs: packed on CPU only (signs_usable)
      std::tie(y, t, w_eff) =
          masked_linear_topk_keeping_weight(x, weight, scores, density, bias, abs_scores, hint,
                                            with_signs ? &signs : nullptr);
      save_linear(ctx, x, weight, scores, t, w_eff, bias, abs_scores, signs);
    }
    ctx->mark_non_differentiable({t});
    return {y, t};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto [grad_x, grad_scores, grad_bias] = linear_grads(ctx, grads[0], /*bias_edge=*/3);
    return {grad_x, at::Tensor(), grad_scores, grad_bias, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor apply_mask_autograd(const at::Tensor& weight, const at::Tensor& scores, const at::Tensor& t,
                               bool abs_scores, std::optional<at::ScalarType> dtype) {
  return StraightThroughMask::apply(weight, scores, t, abs_scores, dtype);
}

at::Tensor masked_linear_autograd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scores,
                                  const at::Tensor& t, const std::optional<at::Tensor>& bias, bool abs_scores) {
  return MaskedLinearFunction::apply(x, weight, scores, t, bias, abs_scores);
}

std::tuple<at::Tensor, at::Tensor> masked_linear_topk_autograd(const at::Tensor& x, const at::Tensor& weight,
                                                               const at::Tensor& scores, double density,
                                                               const std::optional<at::Tensor>& bias, bool abs_scores,
                                                               const std::optional<at::Tensor>& hint) {
  // (inside forward grad mode is off: decided here)
  const bool with_signs = at::GradMode::is_enabled() && scores.requires_grad();
  auto out = MaskedLinearTopKFunction::apply(x, weight, scores, bias, hint, density, abs_scores, with_signs);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(maskprune, Autograd, m) {
  m.impl("apply_mask", &apply_mask_autograd);
  m.impl("masked_linear", &masked_linear_autograd);
  m.impl("masked_linear_topk", &masked_linear_topk_autograd);
}

}  // namespace maskprune
