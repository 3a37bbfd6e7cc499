// CUDA kernels of the mask policies' passes (issue 17): policy_mask, policy_score_grad and
// policy_linear_score_grad, with the rules and outputs of the CPU passes (cpu/policy_ops.cpp, whose header lists
// the modes; the oracle is maskprune.reference.policy_*). One elementwise pass each, grid-stride, on the current
// stream, with t read from device memory (no host sync). One kernel per concern: the thresholded modes (the mode a
// kernel argument, uniform over the grid), biprop's pass with its sums, supermask's sampled pass, the dS pass.
//
// biprop's α = ‖M ⊙ W‖₁ / ‖M‖₀ is summed in the mask pass: each block reduces its threads' float64 |W|·M and
// int64 M sums in shared memory in a fixed order, and one thread adds the block sums in block order, so α is
// deterministic for a given device (no atomics). The policy_masked_linear / policy_apply_mask composites and
// their autograd (cpu/policy_ops.cpp, registered device-generic) reach these kernels through the dispatcher.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>

#include "../checks.h"
#include "../masked_linear.h"
#include "../policy_args.h"

namespace maskprune {
namespace {

constexpr int kThreads = 256;

int blocks_for(int64_t n) {
  const auto* props = at::cuda::getCurrentDeviceProperties();
  const int64_t most = int64_t{props->multiProcessorCount} * (props->maxThreadsPerMultiProcessor / kThreads);
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>((n + kThreads - 1) / kThreads, 1), most));
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), name, " must be a CUDA tensor here, got one on ", t.device());
}

// The product type of W ⊙ M: double when the weight or the output is, else float (exact for W times 0, ±1).
template <typename weight_t, typename out_t>
using acc_type = std::conditional_t<std::is_same_v<weight_t, double> || std::is_same_v<out_t, double>, double, float>;

template <typename T>
__device__ __forceinline__ T sign_of(T v) {
  return T(v > T(0)) - T(v < T(0));
}

__device__ __forceinline__ float abs_of(float v) { return fabsf(v); }
__device__ __forceinline__ double abs_of(double v) { return fabs(v); }

// (The CPU's vectorised exp clamps its argument to [-87, 88], so σ(-100) is ~6e-39 there and 0 here: a mask bit
// can differ only for u = 0.)
__device__ __forceinline__ float sigmoid_of(float s) { return 1.0f / (1.0f + expf(-s)); }
__device__ __forceinline__ double sigmoid_of(double s) { return 1.0 / (1.0 + exp(-s)); }

// out = W ⊙ M for "topk" and "raw", W ⊙ sign(S) ⊙ M for "signed" (α = 1).
template <typename score_t, typename weight_t, typename out_t>
__global__ void __launch_bounds__(kThreads)
    policy_mask_kernel(const weight_t* __restrict__ weight, const score_t* __restrict__ scores,
                       const score_t* __restrict__ t, int mode, out_t* __restrict__ out, int64_t n) {
  using acc_t = acc_type<weight_t, out_t>;
  const auto m = static_cast<PolicyMode>(mode);
  const score_t thr = *t;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const score_t s = scores[i];
    const acc_t w = static_cast<acc_t>(weight[i]);
    const acc_t k = (m == PolicyMode::kRaw ? s : abs_of(s)) >= thr ? acc_t(1) : acc_t(0);
    out[i] = static_cast<out_t>(m == PolicyMode::kSigned ? w * (k * static_cast<acc_t>(sign_of(s))) : w * k);
  }
}

// biprop: out = sign(W) ⊙ M (W_eff / α), and the block's Σ|W|·M and Σ M into block_l1 / block_kept[blockIdx.x]
// (each thread's sums reduced in shared memory in a fixed order).
template <typename score_t, typename weight_t, typename out_t>
__global__ void __launch_bounds__(kThreads)
    binary_mask_kernel(const weight_t* __restrict__ weight, const score_t* __restrict__ scores,
                       const score_t* __restrict__ t, out_t* __restrict__ out, double* __restrict__ block_l1,
                       long long* __restrict__ block_kept, int64_t n) {
  using acc_t = acc_type<weight_t, out_t>;
  const score_t thr = *t;
  double l1 = 0.0;
  long long kept = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const acc_t w = static_cast<acc_t>(weight[i]);
    const bool keep = abs_of(scores[i]) >= thr;
    const acc_t k = keep ? acc_t(1) : acc_t(0);
    out[i] = static_cast<out_t>(sign_of(w) * k);
    l1 += static_cast<double>(abs_of(w) * k);  // |W|·M as on CPU: a NaN or inf W gives NaN
    kept += keep ? 1 : 0;
  }
  __shared__ double l1_of[kThreads];
  __shared__ long long kept_of[kThreads];
  l1_of[threadIdx.x] = l1;
  kept_of[threadIdx.x] = kept;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) {
      l1_of[threadIdx.x] += l1_of[threadIdx.x + half];
      kept_of[threadIdx.x] += kept_of[threadIdx.x + half];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    block_l1[blockIdx.x] = l1_of[0];
    block_kept[blockIdx.x] = kept_of[0];
  }
}

// α = Σ block_l1 / max(Σ block_kept, 1), the blocks added in order by one thread.
template <typename alpha_t>
__global__ void binary_alpha_kernel(const double* __restrict__ block_l1, const long long* __restrict__ block_kept,
                                    int blocks, alpha_t* __restrict__ alpha) {
  double total = 0.0;
  long long count = 0;
  for (int b = 0; b < blocks; ++b) {
    total += block_l1[b];
    count += block_kept[b];
  }
  *alpha = static_cast<alpha_t>(total / static_cast<double>(count > 0 ? count : 1));
}

// supermask's mask pass: out = W ⊙ 1[u < σ(S)] and deriv = σ'(S) ⊙ W (σ once for both; the backward's dS is
// then deriv ⊙ g).
template <typename score_t, typename weight_t, typename out_t>
__global__ void __launch_bounds__(kThreads)
    policy_sampled_mask_kernel(const weight_t* __restrict__ weight, const score_t* __restrict__ scores,
                               const score_t* __restrict__ u, out_t* __restrict__ out, score_t* __restrict__ deriv,
                               int64_t n) {
  using acc_t = acc_type<weight_t, out_t>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const score_t p = sigmoid_of(scores[i]);
    out[i] = static_cast<out_t>(static_cast<acc_t>(weight[i]) * (u[i] < p ? acc_t(1) : acc_t(0)));
    deriv[i] = (p * (score_t(1) - p)) * static_cast<score_t>(weight[i]);
  }
}

// dS = factor(S) ⊙ W ⊙ g for the mode, in the scores' dtype. No __restrict__ on g and out: the linear path
// writes dS over its own weight-gradient buffer (each element read, then written, by one thread).
template <typename score_t, typename weight_t, typename grad_t>
__global__ void __launch_bounds__(kThreads)
    policy_score_grad_kernel(const grad_t* grad_weight, const weight_t* __restrict__ weight,
                             const score_t* __restrict__ scores, int mode, score_t* out, int64_t n) {
  const auto m = static_cast<PolicyMode>(mode);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const score_t v = static_cast<score_t>(weight[i]) * static_cast<score_t>(grad_weight[i]);
    const score_t s = scores[i];
    if (m == PolicyMode::kTopK || m == PolicyMode::kBinary) {
      out[i] = sign_of(s) * v;
    } else if (m == PolicyMode::kSampled) {
      const score_t p = sigmoid_of(s);
      out[i] = (p * (score_t(1) - p)) * v;
    } else {
      out[i] = v;
    }
  }
}

// (Q, α, D) as policy_mask_cpu returns them: Q in `dtype` (default the weight's), α a 0-d tensor on the device,
// D = σ'(S) ⊙ W for "sampled" (else empty).
std::tuple<at::Tensor, at::Tensor, at::Tensor> policy_mask_cuda(const at::Tensor& weight, const at::Tensor& scores,
                                                                const at::Tensor& t, c10::string_view mode_name,
                                                                const std::optional<at::Tensor>& u,
                                                                std::optional<at::ScalarType> dtype) {
  const PolicyMode mode = parse_policy_mode(mode_name);
  check_policy_mask_args(weight, scores, t, mode, u);
  check_cuda(scores, "scores");
  const c10::cuda::CUDAGuard guard(scores.device());
  const auto w = weight.contiguous();
  const auto s = scores.contiguous();
  const bool sampled = mode == PolicyMode::kSampled, binary = mode == PolicyMode::kBinary;
  const at::Tensor uc = sampled ? cast_to(*u, s.scalar_type()).contiguous() : at::Tensor();
  auto out = at::empty(weight.sizes(), weight.options().dtype(dtype.value_or(weight.scalar_type())));
  auto deriv = sampled ? at::empty(scores.sizes(), scores.options()) : at::empty({0}, scores.options());
  const auto alpha_options = weight.options().dtype(policy_alpha_dtype(weight));
  const int64_t n = s.numel();
  if (n == 0) {  // α = 0 / max(0, 1) for "binary", as on CPU
    return {out, binary ? at::zeros({}, alpha_options) : at::ones({}, alpha_options), deriv};
  }
  const int blocks = blocks_for(n);
  auto block_l1 = binary ? at::empty({blocks}, s.options().dtype(at::kDouble)) : at::Tensor();
  auto block_kept = binary ? at::empty({blocks}, s.options().dtype(at::kLong)) : at::Tensor();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "maskprune_policy_mask_cuda_scores", [&] {
    using score_t = scalar_t;
    const auto* sp = s.const_data_ptr<score_t>();
    const auto* tp = t.const_data_ptr<score_t>();
    const score_t* up = sampled ? uc.const_data_ptr<score_t>() : nullptr;
    score_t* dp = sampled ? deriv.mutable_data_ptr<score_t>() : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "maskprune_policy_mask_cuda_w", [&] {
      using weight_t = scalar_t;
      const auto* wp = w.const_data_ptr<weight_t>();
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "maskprune_policy_mask_cuda_out",
                                      [&] {
        auto* op = out.mutable_data_ptr<scalar_t>();
        if (sampled) {
          policy_sampled_mask_kernel<score_t, weight_t, scalar_t><<<blocks, kThreads, 0, stream>>>(wp, sp, up, op,
                                                                                                   dp, n);
        } else if (binary) {
          binary_mask_kernel<score_t, weight_t, scalar_t><<<blocks, kThreads, 0, stream>>>(
              wp, sp, tp, op, block_l1.mutable_data_ptr<double>(),
              reinterpret_cast<long long*>(block_kept.mutable_data_ptr<int64_t>()), n);
        } else {
          policy_mask_kernel<score_t, weight_t, scalar_t><<<blocks, kThreads, 0, stream>>>(
              wp, sp, tp, static_cast<int>(mode), op, n);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  auto alpha = binary ? at::empty({}, alpha_options) : at::ones({}, alpha_options);
  if (binary) {
    AT_DISPATCH_FLOATING_TYPES(alpha.scalar_type(), "maskprune_policy_alpha_cuda", [&] {
      binary_alpha_kernel<scalar_t><<<1, 1, 0, stream>>>(
          block_l1.const_data_ptr<double>(), reinterpret_cast<const long long*>(block_kept.const_data_ptr<int64_t>()),
          blocks, alpha.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {out, alpha, deriv};
}

// dS into `out` (the scores' dtype, contiguous; may be g itself when the dtypes match).
void policy_score_grad_into(PolicyMode mode, const at::Tensor& g, const at::Tensor& w, const at::Tensor& s,
                            at::Tensor& out) {
  const int64_t n = s.numel();
  if (n == 0) return;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "maskprune_policy_score_grad_cuda", [&] {
    using score_t = scalar_t;
    const auto* sp = s.const_data_ptr<score_t>();
    auto* op = out.mutable_data_ptr<score_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "maskprune_policy_score_grad_cuda_w",
                                    [&] {
      using weight_t = scalar_t;
      const auto* wp = w.const_data_ptr<weight_t>();
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(),
                                      "maskprune_policy_score_grad_cuda_g", [&] {
        policy_score_grad_kernel<score_t, weight_t, scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
            g.const_data_ptr<scalar_t>(), wp, sp, static_cast<int>(mode), op, n);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

at::Tensor policy_score_grad_cuda(const at::Tensor& grad_weight, const at::Tensor& weight, const at::Tensor& scores,
                                  c10::string_view mode_name, const std::optional<at::Tensor>& u) {
  const PolicyMode mode = parse_policy_mode(mode_name);
  check_score_grad_args(grad_weight, weight, scores);
  check_policy_u(mode, u, scores);
  check_cuda(scores, "scores");
  const c10::cuda::CUDAGuard guard(scores.device());
  const auto s = scores.contiguous();
  auto out = at::empty_like(s);
  policy_score_grad_into(mode, grad_weight.contiguous(), weight.contiguous(), s, out);
  return out;
}

// dS of policy_masked_linear from its output gradient: cuBLAS's gᵀX, then the score-gradient pass over it (in
// place when x has the scores' dtype).
at::Tensor policy_linear_score_grad_cuda(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                         const at::Tensor& scores, c10::string_view mode_name,
                                         const std::optional<at::Tensor>& u) {
  const PolicyMode mode = parse_policy_mode(mode_name);
  check_policy_linear_grad_args(grad_out, x, weight, scores, mode, u);
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto s = scores.contiguous();
  auto grad_weight = linear_weight_grad(grad_out, x, weight.size(0), weight.size(1));
  auto out = x.scalar_type() == s.scalar_type() ? grad_weight : at::empty_like(s);
  policy_score_grad_into(mode, grad_weight, weight.contiguous(), s, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(maskprune, CUDA, m) {
  m.impl("policy_mask", &policy_mask_cuda);
  m.impl("policy_score_grad", &policy_score_grad_cuda);
  m.impl("policy_linear_score_grad", &policy_linear_score_grad_cuda);
}

}  // namespace maskprune
