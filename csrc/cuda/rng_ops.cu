// CUDA kernel of counter_weights_: the CPU kernel's values (cpu/rng_ops.cpp) from the same philox.h, one
// element per thread in a grid-stride loop, on the current stream. signed_constant, kaiming_uniform and
// uniform equal the CPU's bit for bit; kaiming_normal uses CUDA's float64 log and cos (philox.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

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

template <philox::Dist kDist>
void launch(at::Tensor& out, const CounterArgs& a) {
  const int64_t n = out.numel();
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t{sms} * 16);
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

}  // namespace

TORCH_LIBRARY_IMPL(maskprune, CUDA, m) { m.impl("counter_weights_", &counter_weights_cuda); }

}  // namespace maskprune
