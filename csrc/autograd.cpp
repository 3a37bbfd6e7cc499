// Autograd of apply_mask and masked_weight: the straight-through estimator dS = sign(S) * W * g
// (W * g when abs_scores is false), and no gradient to the weight or t. Written in C++ rather than
// through torch.library.register_autograd so that a masked layer's training step pays no Python for
// these two ops (~40 us per layer and step, forward and backward together, on CPU).
#include <ATen/ATen.h>
#include <ATen/FunctionalTensorWrapper.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>

namespace maskprune {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using MaskOp = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool, std::optional<at::ScalarType>);

c10::TypedOperatorHandle<MaskOp> mask_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<MaskOp>();
}

at::Tensor score_grad(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& scores, bool abs_scores) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("maskprune::score_grad", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool)>();
  return op.call(grad, weight, scores, abs_scores);
}

// dS written over `grad` itself: only for masked_weight, whose output feeds its layer's GEMM alone, so
// that the incoming gradient is that GEMM's fresh weight gradient. Not while a graph of the backward is
// being built (create_graph) or traced (torch.compile hands in Python/functional tensors).
bool may_overwrite(const at::Tensor& grad, const at::Tensor& scores) {
  return !at::GradMode::is_enabled() && grad.scalar_type() == scores.scalar_type() &&
         grad.device() == scores.device() && grad.is_contiguous() &&
         !grad.key_set().has(c10::DispatchKey::Python) && !at::functionalization::impl::isFunctionalTensor(grad);
}

template <bool kPrivateOutput>
struct StraightThroughMask : public torch::autograd::Function<StraightThroughMask<kPrivateOutput>> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& weight, const at::Tensor& scores,
                            const at::Tensor& t, bool abs_scores, std::optional<at::ScalarType> dtype) {
    static const auto op = mask_op(kPrivateOutput ? "maskprune::masked_weight" : "maskprune::apply_mask");
    ctx->save_for_backward({weight, scores});
    ctx->saved_data["abs_scores"] = abs_scores;
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return op.call(weight, scores, t, abs_scores, dtype);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &weight = saved[0], &scores = saved[1];
    const bool abs_scores = ctx->saved_data["abs_scores"].toBool();
    at::Tensor grad_scores;
    if (ctx->needs_input_grad(1) && grads[0].defined()) {
      at::Tensor grad = grads[0];
      if (kPrivateOutput && may_overwrite(grad, scores)) {
        static auto inplace = c10::Dispatcher::singleton()
                                  .findSchemaOrThrow("maskprune::score_grad_", "")
                                  .typed<void(at::Tensor&, const at::Tensor&, const at::Tensor&, bool)>();
        inplace.call(grad, weight, scores, abs_scores);
        grad_scores = grad;
      } else {
        grad_scores = score_grad(grad, weight, scores, abs_scores);
      }
    }
    return {at::Tensor(), grad_scores, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor apply_mask_autograd(const at::Tensor& weight, const at::Tensor& scores, const at::Tensor& t,
                               bool abs_scores, std::optional<at::ScalarType> dtype) {
  return StraightThroughMask<false>::apply(weight, scores, t, abs_scores, dtype);
}

at::Tensor masked_weight_autograd(const at::Tensor& weight, const at::Tensor& scores, const at::Tensor& t,
                                  bool abs_scores, std::optional<at::ScalarType> dtype) {
  return StraightThroughMask<true>::apply(weight, scores, t, abs_scores, dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(maskprune, Autograd, m) {
  m.impl("apply_mask", &apply_mask_autograd);
  m.impl("masked_weight", &masked_weight_autograd);
}

}  // namespace maskprune
