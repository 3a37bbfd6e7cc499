// CUDA kernel of counter_weights_: the CPU kernel's values (cpu/rng_ops.cpp) from the same philox.h, one
// element per thread in a grid-stride loop, on the current stream. signed_constant, kaiming_uniform and
// uniform equal the CPU's bit for bit; kaiming_normal uses CUDA's float64 log and cos (philox.h). Also the
// seed-mode passes (seed_apply_mask, seed_score_grad_), which regenerate W instead of reading it.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>

#include "../philox.h"
#include "../rng_args.h"

namespace maskprune {
namespace {

constexpr int kThreads = 256;

template <philox::Dist kDist, typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    counter_weights_kernel(scalar_t* __restrict__ out, int64_t n, uint64_t offset, uint64_t seed, uint32_t layer,
                           uint32_t stream, float step) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < n; j += stride) {
    const philox::Words w = philox::element_words(offset + static_cast<uint64_t>(j), seed, layer, stream);
    out[j] = static_cast<scalar_t>(philox::value_of(kDist, w, step));
  }
}

// Grid size of the grid-stride kernels: one thread per element, at most 16 blocks per SM.
int64_t blocks_for(int64_t n) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t{sms} * 16);
}

template <philox::Dist kDist>
void launch(at::Tensor& out, const CounterArgs& a) {
  const int64_t n = out.numel();
  const int64_t blocks = blocks_for(n);
  const cudaStream_t cuda_stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "counter_weights_", [&] {
    counter_weights_kernel<kDist, scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, cuda_stream>>>(
        out.data_ptr<scalar_t>(), n, a.offset, a.seed, a.layer, a.stream, a.step);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void counter_weights_cuda(at::Tensor& out, c10::string_view init, double scale, int64_t seed, int64_t layer,
                          int64_t stream, int64_t offset) {
  const CounterArgs a = check_counter_args(out, init, scale, seed, layer, stream, offset);
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  switch (a.dist) {
    case philox::Dist::kSignedConstant: return launch<philox::Dist::kSignedConstant>(out, a);
    case philox::Dist::kKaimingUniform: return launch<philox::Dist::kKaimingUniform>(out, a);
    case philox::Dist::kKaimingNormal: return launch<philox::Dist::kKaimingNormal>(out, a);
    case philox::Dist::kUniform: return launch<philox::Dist::kUniform>(out, a);
  }
}

// ---- seed mode (issue 18 §3): W regenerated in registers, one element per thread, inside the mask pass and
// the dS pass; the same products as apply_mask / score_grad_ over the stored float32 weight (cpu/rng_ops.cpp).

template <philox::Dist kDist, bool kAbs, typename out_t>
__global__ void __launch_bounds__(kThreads)
    seed_mask_kernel(const float* __restrict__ s, const float* __restrict__ t, out_t* __restrict__ out, int64_t n,
                     uint64_t seed, uint32_t layer, float step) {
  const float thr = *t;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < n; j += stride) {
    const float w = philox::value_of(kDist, philox::element_words(static_cast<uint64_t>(j), seed, layer, 0), step);
    const float key = kAbs ? fabsf(s[j]) : s[j];
    out[j] = static_cast<out_t>(__fmul_rn(w, key >= thr ? 1.0f : 0.0f));
  }
}

template <philox::Dist kDist, bool kAbs>
__global__ void __launch_bounds__(kThreads)
    seed_grad_kernel(float* __restrict__ g, const float* __restrict__ s, int64_t n, uint64_t seed, uint32_t layer,
                     float step) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < n; j += stride) {
    const float w = philox::value_of(kDist, philox::element_words(static_cast<uint64_t>(j), seed, layer, 0), step);
    const float v = __fmul_rn(w, g[j]);  // no FMA contraction: the CPU's w * g, then the sign
    if (kAbs) {
      const float sj = s[j];
      g[j] = __fmul_rn((sj > 0.0f ? 1.0f : 0.0f) - (sj < 0.0f ? 1.0f : 0.0f), v);
    } else {
      g[j] = v;
    }
  }
}

at::Tensor seed_apply_mask_cuda(const at::Tensor& scores, const at::Tensor& t, bool abs_scores, c10::string_view init,
                                double scale, int64_t seed, int64_t layer, std::optional<at::ScalarType> dtype) {
  const CounterArgs a = check_seed_key(scores, init, scale, seed, layer);
  check_seed_threshold(scores, t);
  const auto out_dtype = seed_out_dtype(dtype);
  const c10::cuda::CUDAGuard guard(scores.device());
  const at::Tensor s = scores.contiguous();
  at::Tensor out = at::empty(s.sizes(), s.options().dtype(out_dtype));
  const int64_t n = s.numel();
  if (n == 0) return out;
  const cudaStream_t cuda_stream = at::cuda::getCurrentCUDAStream();
  with_dist(a.dist, [&](auto dist) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "seed_apply_mask", [&] {
      const auto launch = [&](auto kernel) {
        kernel<<<static_cast<unsigned>(blocks_for(n)), kThreads, 0, cuda_stream>>>(
            s.data_ptr<float>(), t.data_ptr<float>(), out.data_ptr<scalar_t>(), n, a.seed, a.layer, a.step);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (abs_scores) launch(seed_mask_kernel<decltype(dist)::value, true, scalar_t>);
      else launch(seed_mask_kernel<decltype(dist)::value, false, scalar_t>);
    });
  });
  return out;
}

void seed_score_grad_cuda(at::Tensor& grad_weight, const at::Tensor& scores, bool abs_scores, c10::string_view init,
                          double scale, int64_t seed, int64_t layer) {
  const CounterArgs a = check_seed_key(scores, init, scale, seed, layer);
  check_seed_grad(grad_weight, scores);
  const int64_t n = grad_weight.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(scores.device());
  const at::Tensor s = scores.contiguous();
  const cudaStream_t cuda_stream = at::cuda::getCurrentCUDAStream();
  with_dist(a.dist, [&](auto dist) {
    const auto launch = [&](auto kernel) {
      kernel<<<static_cast<unsigned>(blocks_for(n)), kThreads, 0, cuda_stream>>>(
          grad_weight.data_ptr<float>(), s.data_ptr<float>(), n, a.seed, a.layer, a.step);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (abs_scores) launch(seed_grad_kernel<decltype(dist)::value, true>);
    else launch(seed_grad_kernel<decltype(dist)::value, false>);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(maskprune, CUDA, m) {
  m.impl("counter_weights_", &counter_weights_cuda);
  m.impl("seed_apply_mask", &seed_apply_mask_cuda);
  m.impl("seed_score_grad_", &seed_score_grad_cuda);
}

}  // namespace maskprune
