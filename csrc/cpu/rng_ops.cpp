// CPU kernel of counter_weights_: fills a tensor with maskprune's Philox4x32-10 values (philox.h), element
// i of `out` being element offset + i of the (seed, layer, stream) sequence. Each element stands alone, so
// the work splits over threads in any way without changing a bit.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "../philox.h"
#include "../rng_args.h"

namespace maskprune {
namespace {

constexpr int64_t kGrain = 1 << 14;  // elements per task: ~50 us of Philox, well above parallel_for's overhead
constexpr int64_t kBlock = 256;      // elements computed into a float32 buffer, then cast into out

// out[j] = value of element base + j for j in [0, n): the float32 values go straight into a float32 out,
// else through a small buffer (an exact cast for float64, round-to-nearest for float16/bfloat16, as torch's).
template <philox::Dist kDist>
void fill_values(float* __restrict__ dst, int64_t n, uint64_t base, const CounterArgs& a) {
  const uint32_t k0 = static_cast<uint32_t>(a.seed), k1 = static_cast<uint32_t>(a.seed >> 32);
  for (int64_t j = 0; j < n; ++j) {
    const uint64_t i = base + static_cast<uint64_t>(j);
    const philox::Words w =
        philox::philox4x32_10(static_cast<uint32_t>(i), static_cast<uint32_t>(i >> 32), a.layer, a.stream, k0, k1);
    dst[j] = philox::value_of(kDist, w, a.step);
  }
}

template <philox::Dist kDist, typename scalar_t>
void fill_range(scalar_t* out, int64_t begin, int64_t end, const CounterArgs& a) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    fill_values<kDist>(out + begin, end - begin, a.offset + static_cast<uint64_t>(begin), a);
  } else {
    float buffer[kBlock];
    for (int64_t b = begin; b < end; b += kBlock) {
      const int64_t n = std::min(kBlock, end - b);
      fill_values<kDist>(buffer, n, a.offset + static_cast<uint64_t>(b), a);
      for (int64_t j = 0; j < n; ++j) out[b + j] = static_cast<scalar_t>(buffer[j]);
    }
  }
}

template <philox::Dist kDist>
void fill(at::Tensor& out, const CounterArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "counter_weights_", [&] {
    scalar_t* data = out.data_ptr<scalar_t>();
    at::parallel_for(0, out.numel(), kGrain, [&](int64_t begin, int64_t end) {
      fill_range<kDist, scalar_t>(data, begin, end, a);
    });
  });
}

void counter_weights_cpu(at::Tensor& out, c10::string_view init, double scale, int64_t seed, int64_t layer,
                         int64_t stream, int64_t offset) {
  const CounterArgs a = check_counter_args(out, init, scale, seed, layer, stream, offset);
  if (out.numel() == 0) return;
  switch (a.dist) {
    case philox::Dist::kSignedConstant: return fill<philox::Dist::kSignedConstant>(out, a);
    case philox::Dist::kKaimingUniform: return fill<philox::Dist::kKaimingUniform>(out, a);
    case philox::Dist::kKaimingNormal: return fill<philox::Dist::kKaimingNormal>(out, a);
    case philox::Dist::kUniform: return fill<philox::Dist::kUniform>(out, a);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(maskprune, CPU, m) { m.impl("counter_weights_", &counter_weights_cpu); }

}  // namespace maskprune
