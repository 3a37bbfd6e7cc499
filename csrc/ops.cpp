// The schema of every maskprune op, in one place. Implementations register against it from
// cpu/ (CPU kernels), cuda/ (CUDA kernels), masked_linear.cpp (device-generic composites) and
// autograd.cpp (the autograd of apply_mask and masked_linear).
#include <Python.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <exception>

#include "cpu/buffer_pool.h"

namespace {

// A C++ exception as a Python one (ValueError for c10::ValueError), instead of terminating the process.
template <typename F>
PyObject* guarded(F&& body) {
  try {
    return body();
  } catch (const c10::ValueError& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

// _C.cpu_cache_bytes() -> int: bytes of freed buffers the CPU buffer cache holds (cpu/buffer_pool.h).
PyObject* cpu_cache_bytes(PyObject*, PyObject*) {
  return guarded([] { return PyLong_FromSize_t(maskprune::buffer_pool_cached_bytes()); });
}

// _C.release_cpu_cache(): frees them.
PyObject* release_cpu_cache(PyObject*, PyObject*) {
  return guarded([] {
    maskprune::buffer_pool_release();
    Py_RETURN_NONE;
  });
}

PyMethodDef methods[] = {
    {"cpu_cache_bytes", cpu_cache_bytes, METH_NOARGS, "Bytes of freed buffers held by the CPU buffer cache."},
    {"release_cpu_cache", release_cpu_cache, METH_NOARGS, "Frees the buffers held by the CPU buffer cache."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" {
// `import maskprune._C` loads this library, whose static initialisers register the ops below; the module
// itself only carries the CPU buffer cache's two functions.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(maskprune, m) {
  // Fills `out` (contiguous) with the counter-based values of maskprune.rng (philox.h): out's element j is
  // element offset + j of the Philox4x32-10 sequence keyed (seed, layer, stream), seed the int64 bits of the
  // 64-bit seed; init one of signed_constant, kaiming_uniform, kaiming_normal (weights of scale `scale`) or
  // uniform (u * scale, u in [0, 1)). Computed in float32, cast to out's dtype.
  m.def("counter_weights_(Tensor(a!) out, str init, float scale, int seed, int layer, int stream=0, int offset=0) -> ()");
  // supermask's fused training draw (CPU): (W * 1[u < probs], probs * (1 - probs)), u = counter_weights_'s
  // "uniform" values of (seed, layer, stream) over the weight's elements; float32 weight and probs.
  m.def("supermask_philox_mask(Tensor weight, Tensor probs, int seed, int layer, int stream) -> (Tensor, Tensor)");
  // Seed mode (frozen weights that take no memory): W is regenerated from counter_weights_'s (init, scale, seed,
  // layer) values on stream 0 inside the pass instead of read. W * 1[key >= t] (key |S|, or S when abs_scores=False)
  // in `dtype` (default float32), bit for bit apply_mask over the stored float32 weight; float32 scores and t.
  m.def(
      "seed_apply_mask(Tensor scores, Tensor t, bool abs_scores, str init, float scale, int seed, int layer, "
      "ScalarType? dtype=None) -> Tensor");
  // score_grad_ over the regenerated W: grad_weight <- sign(S) * W * grad_weight (W * grad_weight if not
  // abs_scores); grad_weight float32, contiguous, the scores' shape.
  m.def(
      "seed_score_grad_(Tensor(a!) grad_weight, Tensor scores, bool abs_scores, str init, float scale, int seed, "
      "int layer) -> ()");
  // dS of a seed-mode linear layer from grad_out: the weight-gradient GEMM X-side (dYᵀ X, in x's dtype; on CPU into
  // the buffer cache, as masked_linear_backward's), then seed_score_grad_ over it. float32 result.
  m.def(
      "seed_linear_score_grad(Tensor grad_out, Tensor x, Tensor scores, bool abs_scores, str init, float scale, "
      "int seed, int layer) -> Tensor");
  // t: the n_keep-th largest key (|S|, or S when abs_scores=False), n_keep = clamp(floor(density*n + 1/2), 1, n).
  // `hint`, a previous t of these scores, may speed the selection up; the result never depends on it.
  m.def("threshold(Tensor scores, float density, bool abs_scores, Tensor? hint=None) -> Tensor");
  // One t over all tensors together (global top-k), without concatenating them.
  m.def("global_threshold(Tensor[] scores, float density, bool abs_scores, Tensor? hint=None) -> Tensor");
  // W * 1[key >= t], cast to `dtype` (default: the weight's) in the same pass.
  m.def("apply_mask(Tensor weight, Tensor scores, Tensor t, bool abs_scores, ScalarType? dtype=None) -> Tensor");
  // Straight-through score gradient: sign(S) * W * grad_weight (W * grad_weight if not abs_scores), in S's dtype.
  m.def("score_grad(Tensor grad_weight, Tensor weight, Tensor scores, bool abs_scores) -> Tensor");
  // The same, written over grad_weight (which must have the scores' dtype and be contiguous).
  m.def("score_grad_(Tensor(a!) grad_weight, Tensor weight, Tensor scores, bool abs_scores) -> ()");
  // (t, W * 1[key >= t]) of threshold(scores, density, abs_scores, hint) and apply_mask(weight, scores, t,
  // abs_scores, dtype) together: on CPU one pass over the scores when t lies near the hint.
  m.def(
      "threshold_and_mask(Tensor weight, Tensor scores, float density, bool abs_scores, Tensor? hint=None, "
      "ScalarType? dtype=None) -> (Tensor, Tensor)");
  // threshold_and_mask and the scores' signs packed for the backward: (t, W * 1[key >= t], signs), signs a
  // uint8 tensor of (numel + 3) / 4 bytes, per four scores the negative bits (low nibble) and nonzero bits
  // (high nibble) (cpu/score_signs.h). CPU only: its score gradient then reads signs instead of the scores.
  m.def(
      "threshold_and_mask_signs(Tensor weight, Tensor scores, float density, bool abs_scores, Tensor? hint=None, "
      "ScalarType? dtype=None) -> (Tensor, Tensor, Tensor)");
  // score_grad_ (abs_scores=True) with sign(S) from those sign bytes; float32 grad_weight.
  m.def("score_grad_signs_(Tensor(a!) grad_weight, Tensor weight, Tensor signs) -> ()");
  // Y = X (W * M)^T (+ b) over x of shape (..., in_features), computed in x's dtype.
  m.def("masked_linear(Tensor x, Tensor weight, Tensor scores, Tensor t, Tensor? bias, bool abs_scores) -> Tensor");
  // (Y, t): masked_linear whose layer-wise threshold t is found in the same call (through threshold_and_mask),
  // for a layer whose scores changed since its last threshold (a training step).
  m.def(
      "masked_linear_topk(Tensor x, Tensor weight, Tensor scores, float density, Tensor? bias, bool abs_scores, "
      "Tensor? hint=None) -> (Tensor, Tensor)");
  // (dX, dS) of masked_linear; an output that is not needed comes back as an empty tensor. `signs`, the
  // scores' sign bytes from threshold_and_mask_signs, stand in for the scores in dS on CPU with |S| keys
  // and float32 x and scores; elsewhere they are ignored.
  m.def(
      "masked_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor scores, Tensor t, "
      "bool abs_scores, bool need_grad_x, bool need_grad_scores, Tensor? signs=None) -> (Tensor, Tensor)");

  // ---- mask policies (issue 17; cpu/policy_ops.cpp): `mode` is one of topk, raw, signed, binary, sampled ----
  // (Q, α) with W_eff = α Q: Q = W ⊙ 1[key >= t] (topk: |S|, raw: S), W ⊙ sign(S) ⊙ 1[|S| >= t] (signed),
  // sign(W) ⊙ 1[|S| >= t] with α = ‖M ⊙ W‖₁ / ‖M‖₀ found in the same pass (binary), W ⊙ 1[u < σ(S)] (sampled; t
  // unused); α = 1 except for binary, a 0-d tensor of the weight's dtype promoted to >= float32. `u`: exactly for
  // sampled. Q in `dtype` (default the weight's). Third output: for sampled D = σ'(S) ⊙ W in the scores' dtype
  // (the backward's dS is D ⊙ ∂L/∂W_eff, with no second σ), else an empty tensor.
  m.def(
      "policy_mask(Tensor weight, Tensor scores, Tensor t, str mode, Tensor? u=None, ScalarType? dtype=None) "
      "-> (Tensor, Tensor, Tensor)");
  // α Q, with the straight-through dS of the mode (policy_score_grad).
  m.def(
      "policy_apply_mask(Tensor weight, Tensor scores, Tensor t, str mode, Tensor? u=None, ScalarType? dtype=None) "
      "-> Tensor");
  // dS = f ⊙ W ⊙ grad_weight in S's dtype: f = sign(S) (topk, binary), 1 (raw, signed), σ'(S) (sampled).
  m.def("policy_score_grad(Tensor grad_weight, Tensor weight, Tensor scores, str mode, Tensor? u=None) -> Tensor");
  // Y = α X Qᵀ (+ b) in x's dtype (α on the GEMM's output); gradients to x, scores and bias.
  m.def(
      "policy_masked_linear(Tensor x, Tensor weight, Tensor scores, Tensor t, Tensor? bias, str mode, "
      "Tensor? u=None) -> Tensor");
  // dS of policy_masked_linear from grad_out: the weight-gradient GEMM, then the dS pass over its output.
  m.def(
      "policy_linear_score_grad(Tensor grad_out, Tensor x, Tensor weight, Tensor scores, str mode, "
      "Tensor? u=None) -> Tensor");
}
