// masked_linear (also with its threshold found in the same call) and its backward as device-generic composites:
// the fused mask pass (apply_mask) writes W ⊙ M once in x's dtype and feeds the platform GEMM (MKL/oneDNN on
// CPU, cuBLAS on CUDA), and the weight-gradient GEMM feeds the fused score-gradient pass (in place). CUDA
// uses these too: a hand-written masked GEMM that applies the mask inside its main loop was estimated at
// 5-10x cuBLAS's time (docs/design.md §3), the mask pass costs ~8 bytes per weight once per step.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/buffer_pool.h"
#include "masked_linear.h"

namespace maskprune {

at::Tensor call_apply_mask(const at::Tensor& weight, const at::Tensor& scores, const at::Tensor& t,
                           bool abs_scores, std::optional<at::ScalarType> dtype) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("maskprune::apply_mask", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool,
                                         std::optional<at::ScalarType>)>();
  return op.call(weight, scores, t, abs_scores, dtype);
}

at::Tensor call_score_grad(const at::Tensor& grad_weight, const at::Tensor& weight, const at::Tensor& scores,
                           bool abs_scores) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("maskprune::score_grad", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool)>();
  return op.call(grad_weight, weight, scores, abs_scores);
}

std::tuple<at::Tensor, at::Tensor> call_threshold_and_mask(const at::Tensor& weight, const at::Tensor& scores,
                                                           double density, bool abs_scores,
                                                           const std::optional<at::Tensor>& hint,
                                                           std::optional<at::ScalarType> dtype) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("maskprune::threshold_and_mask", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, double, bool,
                                                                 const std::optional<at::Tensor>&,
                                                                 std::optional<at::ScalarType>)>();
  return op.call(weight, scores, density, abs_scores, hint, dtype);
}

at::Tensor call_threshold(const at::Tensor& scores, double density, bool abs_scores,
                          const std::optional<at::Tensor>& hint) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("maskprune::threshold", "")
                       .typed<at::Tensor(const at::Tensor&, double, bool, const std::optional<at::Tensor>&)>();
  return op.call(scores, density, abs_scores, hint);
}

at::Tensor call_masked_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scores,
                              const at::Tensor& t, const std::optional<at::Tensor>& bias, bool abs_scores) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("maskprune::masked_linear", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&, bool)>();
  return op.call(x, weight, scores, t, bias, abs_scores);
}

// gᵀX of a linear layer (out_features, in_features) in x's dtype, for the score-gradient passes to finish: on CPU
// into the buffer cache (it becomes the scores' .grad, freed by zero_grad and reused next step), elsewhere a new
// tensor. No autograd graph: out= GEMMs refuse inputs that require grad under grad mode (backward with
// create_graph=True), and these backwards are not differentiable anyway.
at::Tensor linear_weight_grad(const at::Tensor& grad_out, const at::Tensor& x, int64_t out_features,
                              int64_t in_features) {
  // reshape(-1, 0) is ambiguous: spell the rows out (the product of the leading dimensions).
  const int64_t rows = c10::multiply_integers(x.sizes().slice(0, x.dim() - 1));
  const auto g2d = grad_out.to(x.scalar_type()).reshape({rows, out_features});
  const auto x2d = x.reshape({rows, in_features});
  auto grad_weight = x.device().is_cpu() ? pooled_empty({out_features, in_features}, x.options())
                                         : at::empty({out_features, in_features}, x.options());
  at::NoGradGuard no_grad;
  at::mm_out(grad_weight, g2d.t(), x2d);
  return grad_weight;
}

namespace {

// Whether the backward's dS pass can read the scores' packed signs (score_grad_signs_: CPU, |S| keys, a
// float32 weight gradient over float32 scores). Elsewhere no signs are packed, and given ones are ignored.
bool signs_usable(const at::Tensor& x, const at::Tensor& scores, bool abs_scores) {
  return abs_scores && x.device().is_cpu() && scores.device().is_cpu() && x.scalar_type() == at::kFloat &&
         scores.scalar_type() == at::kFloat;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_threshold_and_mask_signs(
    const at::Tensor& weight, const at::Tensor& scores, double density, bool abs_scores,
    const std::optional<at::Tensor>& hint, std::optional<at::ScalarType> dtype) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("maskprune::threshold_and_mask_signs", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, double, bool, const std::optional<at::Tensor>&,
                           std::optional<at::ScalarType>)>();
  return op.call(weight, scores, density, abs_scores, hint, dtype);
}

// The bias in x's dtype, checked; cast only when needed: an operator below autograd must not hand
// back its input (opcheck).
std::optional<at::Tensor> bias_for(const std::optional<at::Tensor>& bias, const at::Tensor& x,
                                   const at::Tensor& weight) {
  if (!bias.has_value() || !bias->defined()) return std::nullopt;
  check_linear_bias(*bias, weight);
  return bias->scalar_type() == x.scalar_type() ? *bias : bias->to(x.scalar_type());
}

// The two ops one after the other, for devices without a fused kernel.
std::tuple<at::Tensor, at::Tensor> threshold_and_mask(const at::Tensor& weight, const at::Tensor& scores,
                                                      double density, bool abs_scores,
                                                      const std::optional<at::Tensor>& hint,
                                                      std::optional<at::ScalarType> dtype) {
  auto t = call_threshold(scores, density, abs_scores, hint);
  return {t, call_apply_mask(weight, scores, t, abs_scores, dtype)};
}

// dS from a freshly computed weight gradient, written over it when the dtypes allow (one buffer less); from
// the scores' sign bytes instead of the scores where the forward packed them.
at::Tensor score_grad_over(at::Tensor grad_weight, const at::Tensor& weight, const at::Tensor& scores,
                           bool abs_scores, const std::optional<at::Tensor>& signs) {
  if (signs.has_value() && signs->defined() && signs_usable(grad_weight, scores, abs_scores)) {
    static auto from_signs = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("maskprune::score_grad_signs_", "")
                                 .typed<void(at::Tensor&, const at::Tensor&, const at::Tensor&)>();
    from_signs.call(grad_weight, weight, *signs);
    return grad_weight;
  }
  if (grad_weight.scalar_type() == scores.scalar_type() && grad_weight.is_contiguous()) {
    static auto inplace = c10::Dispatcher::singleton()
                              .findSchemaOrThrow("maskprune::score_grad_", "")
                              .typed<void(at::Tensor&, const at::Tensor&, const at::Tensor&, bool)>();
    inplace.call(grad_weight, weight, scores, abs_scores);
    return grad_weight;
  }
  return call_score_grad(grad_weight, weight, scores, abs_scores);
}

at::Tensor masked_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scores,
                         const at::Tensor& t, const std::optional<at::Tensor>& bias, bool abs_scores) {
  return masked_linear_keeping_weight(x, weight, scores, t, bias, abs_scores).first;
}

std::tuple<at::Tensor, at::Tensor> masked_linear_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                          const at::Tensor& weight, const at::Tensor& scores,
                                                          const at::Tensor& t, bool abs_scores,
                                                          bool need_grad_x, bool need_grad_scores,
                                                          const std::optional<at::Tensor>& signs) {
  check_linear_args(x, weight, scores, t);
  check_linear_grad_out(grad_out, x, weight);
  const int64_t out_features = weight.size(0), in_features = weight.size(1);
  at::Tensor grad_x = at::empty({0}, x.options());
  at::Tensor grad_scores = at::empty({0}, scores.options());
  const auto g = grad_out.to(x.scalar_type());
  if (need_grad_x) {
    grad_x = at::matmul(g, call_apply_mask(weight, scores, t, abs_scores, x.scalar_type()));
  }
  if (need_grad_scores) {
    const auto grad_weight = linear_weight_grad(g, x, out_features, in_features);  // g's cast is then a no-op
    grad_scores = score_grad_over(grad_weight, weight, scores, abs_scores, signs);
  }
  return {grad_x, grad_scores};
}

// seed_linear_score_grad: masked_linear_backward's dS half with W regenerated by seed_score_grad_ (the same
// buffers: the weight-gradient GEMM into the CPU cache, dS written over it when it is float32).
at::Tensor seed_linear_score_grad(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& scores,
                                  bool abs_scores, c10::string_view init, double scale, int64_t seed, int64_t layer) {
  TORCH_CHECK_VALUE(scores.dim() == 2, "scores must be 2-D (out_features, in_features), got shape ", scores.sizes());
  check_linear_shapes(x, scores);
  check_linear_grad_out(grad_out, x, scores);
  auto grad_weight = linear_weight_grad(grad_out, x, scores.size(0), scores.size(1));
  if (grad_weight.scalar_type() != at::kFloat) grad_weight = grad_weight.to(at::kFloat);
  static auto seed_grad = c10::Dispatcher::singleton()
                              .findSchemaOrThrow("maskprune::seed_score_grad_", "")
                              .typed<void(at::Tensor&, const at::Tensor&, bool, c10::string_view, double, int64_t,
                                          int64_t)>();
  seed_grad.call(grad_weight, scores, abs_scores, init, scale, seed, layer);
  return grad_weight;
}

}  // namespace

std::pair<at::Tensor, at::Tensor> masked_linear_keeping_weight(const at::Tensor& x, const at::Tensor& weight,
                                                               const at::Tensor& scores, const at::Tensor& t,
                                                               const std::optional<at::Tensor>& bias,
                                                               bool abs_scores) {
  check_linear_args(x, weight, scores, t);
  const auto b = bias_for(bias, x, weight);
  auto w_eff = call_apply_mask(weight, scores, t, abs_scores, x.scalar_type());
  auto y = at::linear(x, w_eff, b);
  return {std::move(y), std::move(w_eff)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_linear_topk_keeping_weight(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scores, double density,
    const std::optional<at::Tensor>& bias, bool abs_scores, const std::optional<at::Tensor>& hint,
    at::Tensor* signs) {
  check_linear_shapes(x, weight);
  const auto b = bias_for(bias, x, weight);
  at::Tensor t, w_eff;
  if (signs != nullptr && signs_usable(x, scores, abs_scores)) {
    std::tie(t, w_eff, *signs) = call_threshold_and_mask_signs(weight, scores, density, abs_scores, hint,
                                                               x.scalar_type());
  } else {
    std::tie(t, w_eff) = call_threshold_and_mask(weight, scores, density, abs_scores, hint, x.scalar_type());
  }
  auto y = at::linear(x, w_eff, b);
  return {std::move(y), std::move(t), std::move(w_eff)};
}

std::tuple<at::Tensor, at::Tensor> masked_linear_topk(const at::Tensor& x, const at::Tensor& weight,
                                                      const at::Tensor& scores, double density,
                                                      const std::optional<at::Tensor>& bias, bool abs_scores,
                                                      const std::optional<at::Tensor>& hint) {
  if (x.device().is_cpu()) {
    auto [y, t, w_eff] = masked_linear_topk_keeping_weight(x, weight, scores, density, bias, abs_scores, hint);
    return {std::move(y), std::move(t)};
  }
  check_linear_shapes(x, weight);
  auto t = call_threshold(scores, density, abs_scores, hint);
  return {call_masked_linear(x, weight, scores, t, bias, abs_scores), t};
}

TORCH_LIBRARY_IMPL(maskprune, CompositeExplicitAutograd, m) {
  m.impl("threshold_and_mask", &threshold_and_mask);
  m.impl("masked_linear", &masked_linear);
  m.impl("masked_linear_topk", &masked_linear_topk);
  m.impl("masked_linear_backward", &masked_linear_backward);
  m.impl("seed_linear_score_grad", &seed_linear_score_grad);
}

}  // namespace maskprune
