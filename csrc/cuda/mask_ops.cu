// CUDA kernels: radix-select threshold (no sort, no host synchronisation), the fused mask pass and
// the fused score-gradient pass. Results equal the CPU kernels' (cpu/mask_ops.cpp) bit for bit.
//
// threshold / global_threshold launch, on the current stream, for each 11-bit digit of the key
// (11 + 11 + 10 bits for float32, 5 x 11 + 9 for float64), from the most significant down:
//   radix_histogram_kernel  once per score tensor: each block counts, in a 2048-bin histogram in its
//                           shared memory, the digit of the keys whose higher digits equal the prefix
//                           chosen so far (all keys in the first pass); keys sharing a digit within a
//                           warp are one shared-memory atomic; the block then adds its non-zero bins to
//                           that pass's global histogram (at most 2048 global atomics per block);
//   radix_scan_kernel       one warp: walks the 2048 bins from the top down to the bin holding the
//                           rank-th largest key; appends that digit to the prefix, keeps the rank left
//                           within the bin, and after the last digit writes t = decode(prefix).
// All state (histograms, prefix, rank, non-finite count) lives in one zero-initialised device buffer.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "../checks.h"

namespace maskprune {
namespace {

constexpr int kRadixBits = 11;
constexpr int kBins = 1 << kRadixBits;  // 2048 counters: 8 KB of shared memory per histogram block
constexpr int kHistThreads = 256;
constexpr int kElementwiseThreads = 256;
constexpr int kVec = 4;  // elements per thread-iteration in the elementwise kernels when aligned
// ...but at most 16 bytes of the widest operand per load: 4 float64 elements per thread spilled registers
// (16-64 bytes in apply_mask with a float64 operand on sm_80/sm_90, scripts/check_ptxas.py); 2 do not.
constexpr int kVecBytes = 16;
template <typename A, typename B, typename C>
constexpr int vec_width() {
  constexpr size_t widest = sizeof(A) > sizeof(B) ? (sizeof(A) > sizeof(C) ? sizeof(A) : sizeof(C))
                                                  : (sizeof(B) > sizeof(C) ? sizeof(B) : sizeof(C));
  return static_cast<int>(kVecBytes / widest < kVec ? kVecBytes / widest : kVec);
}
constexpr unsigned kFullMask = 0xffffffffu;

// Slots of the select state, stored right after the histograms in the same device buffer.
enum StateSlot { kPrefix = 0, kRank = 1, kNonfinite = 2, kStateSlots = 4 };

using counter_t = unsigned long long;  // 64-bit counts: a global threshold may span > 2^32 scores

template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

template <typename scalar_t>
using key_t = typename KeyBits<scalar_t>::type;

__device__ __forceinline__ uint32_t bits_of(float v) { return __float_as_uint(v); }
__device__ __forceinline__ uint64_t bits_of(double v) {
  return static_cast<uint64_t>(__double_as_longlong(v));
}
template <typename scalar_t> __device__ __forceinline__ scalar_t from_bits(key_t<scalar_t> raw);
template <> __device__ __forceinline__ float from_bits<float>(uint32_t raw) { return __uint_as_float(raw); }
template <> __device__ __forceinline__ double from_bits<double>(uint64_t raw) {
  return __longlong_as_double(static_cast<long long>(raw));
}

__device__ __forceinline__ float abs_of(float v) { return fabsf(v); }
__device__ __forceinline__ double abs_of(double v) { return fabs(v); }

// The digits of a key, top down: pass p covers bits [shift, top) with top = bits - kRadixBits * p.
MP_HOST_DEVICE constexpr int radix_passes(int bits) { return (bits + kRadixBits - 1) / kRadixBits; }
MP_HOST_DEVICE constexpr int digit_top(int bits, int pass) { return bits - kRadixBits * pass; }
MP_HOST_DEVICE constexpr int digit_shift(int bits, int pass) {
  return digit_top(bits, pass) > kRadixBits ? digit_top(bits, pass) - kRadixBits : 0;
}

int max_blocks(int threads) {
  const auto* props = at::cuda::getCurrentDeviceProperties();
  return props->multiProcessorCount * (props->maxThreadsPerMultiProcessor / threads);
}

int blocks_for(int64_t work, int threads) {
  const int64_t needed = std::max<int64_t>((work + threads - 1) / threads, 1);
  return static_cast<int>(std::min<int64_t>(needed, max_blocks(threads)));
}

bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// ---------------------------------------------------------------------------------------------
// Radix select.

// Counts one key's digit in the block's shared-memory histogram: keys sharing a digit within a warp
// are counted by one shared atomic (__match_any_sync), which keeps tied or clustered scores (whose
// top digits crowd into a few bins) from serialising on one counter. Every lane of the warp must call
// this together (it votes); `want` says whether its key counts.
__device__ __forceinline__ void count_digit(unsigned* bins, bool want, unsigned digit) {
  const unsigned active = __ballot_sync(kFullMask, want);
  if (want) {
    const unsigned peers = __match_any_sync(active, digit);
    if ((threadIdx.x & 31) == __ffs(peers) - 1) atomicAdd(bins + digit, static_cast<unsigned>(__popc(peers)));
  }
}

// Histogram of digit `pass` of the keys whose higher digits equal the prefix found so far, in shared
// memory per block, added to the global histogram once at the end. V elements per thread (one 128-bit
// load when V > 1); the loop bounds are block-uniform so that whole warps vote in count_digit. Pass 0
// also counts non-finite scores.
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kHistThreads)
    radix_histogram_kernel(const scalar_t* __restrict__ data, int64_t n, bool abs_scores, int pass,
                           counter_t* __restrict__ hist, counter_t* __restrict__ state) {
  using K = KeyBits<scalar_t>;
  using U = typename K::type;
  const int top = digit_top(K::bits, pass), shift = digit_shift(K::bits, pass);
  const U high_mask = pass == 0 ? U(0) : (~U(0) << top);
  const U prefix = pass == 0 ? U(0) : static_cast<U>(state[kPrefix]);
  const unsigned digit_mask = (1u << (top - shift)) - 1u;
  counter_t nonfinite = 0;
  __shared__ unsigned bins[kBins];  // a block counts far fewer than 2^32 keys
  for (int b = threadIdx.x; b < kBins; b += blockDim.x) bins[b] = 0;
  __syncthreads();

  auto count = [&](scalar_t value, bool valid) {
    const U raw = bits_of(value);
    if (pass == 0) nonfinite += (valid && (raw & K::exponent) == K::exponent);
    const U key = encode_key<U, K::sign>(raw, abs_scores);
    const auto digit = static_cast<unsigned>(key >> shift) & digit_mask;
    count_digit(bins, valid && (key & high_mask) == prefix, digit);
  };

  const int64_t n_vec = n / V;
  const auto* vec_data = reinterpret_cast<const Vec<scalar_t, V>*>(data);
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x; base < n_vec;
       base += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = base + threadIdx.x;
    const bool valid = i < n_vec;
    Vec<scalar_t, V> x{};
    if (valid) x = vec_data[i];
#pragma unroll
    for (int k = 0; k < V; ++k) count(x.v[k], valid);
  }
  if (V > 1 && blockIdx.x == 0) {  // the n % V elements after the last whole vector
    const int64_t i = n_vec * V + threadIdx.x;
    const bool valid = i < n;
    count(valid ? data[i] : scalar_t(0), valid);
  }
  if (nonfinite) atomicAdd(state + kNonfinite, nonfinite);
  __syncthreads();
  for (int b = threadIdx.x; b < kBins; b += blockDim.x) {
    if (bins[b]) atomicAdd(hist + b, static_cast<counter_t>(bins[b]));
  }
}

// Warp-wide inclusive prefix sum over lanes.
__device__ __forceinline__ counter_t warp_inclusive_sum(counter_t v) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const counter_t up = __shfl_up_sync(kFullMask, v, d);
    if (lane >= d) v += up;
  }
  return v;
}

// Walks the kBins counts from the last (highest bin) down, 32 at a time; returns the first index at
// which the keys counted so far (above + these counts) reach rank, and adds the counts above that
// index to `above`. Called by a whole warp; every lane gets the same answer.
__device__ __forceinline__ int warp_find_bin(const counter_t* __restrict__ counts, counter_t rank, counter_t& above) {
  const int lane = threadIdx.x & 31;
  for (int r = 0; r < kBins / 32; ++r) {
    const counter_t c = counts[kBins - 1 - (r * 32 + lane)];
    const counter_t inclusive = warp_inclusive_sum(c);  // keys in bins kBins-1 - r*32 down to this lane's
    const unsigned hit = __ballot_sync(kFullMask, above + inclusive >= rank);
    if (hit) {
      const int first = __ffs(hit) - 1;
      above += __shfl_sync(kFullMask, inclusive - c, first);
      return kBins - 1 - (r * 32 + first);
    }
    above += __shfl_sync(kFullMask, inclusive, 31);
  }
  return -1;
}

// One warp. rank is the 1-based rank (largest first) of the answer among the keys with the current
// prefix; finds the largest digit d with (#keys with digit >= d) >= rank.
template <typename scalar_t>
__global__ void __launch_bounds__(32)
    radix_scan_kernel(const counter_t* __restrict__ hist, counter_t* __restrict__ state, int pass, int64_t n_keep,
                      bool abs_scores, scalar_t* __restrict__ out) {
  using K = KeyBits<scalar_t>;
  using U = typename K::type;
  constexpr int passes = radix_passes(K::bits);
  const counter_t rank = pass == 0 ? static_cast<counter_t>(n_keep) : state[kRank];
  const U prefix = pass == 0 ? U(0) : static_cast<U>(state[kPrefix]);
  counter_t above = 0;  // keys with the prefix in bins above the one being examined
  const int digit = warp_find_bin(hist, rank, above);
  CUDA_KERNEL_ASSERT(digit >= 0 && "radix select: histogram holds fewer keys than the rank");
  if (threadIdx.x != 0) return;
  const U key_prefix = prefix | (static_cast<U>(digit) << digit_shift(K::bits, pass));
  state[kPrefix] = key_prefix;
  state[kRank] = rank - above;  // rank left among the keys of the chosen bin
  if (pass == passes - 1) {
    // Every digit is now fixed: the prefix is the n_keep-th largest key. NaN flags non-finite scores.
    const U raw = decode_key<U, K::sign>(key_prefix, abs_scores);
    out[0] = state[kNonfinite] ? from_bits<scalar_t>(K::exponent | (K::exponent >> 1)) : from_bits<scalar_t>(raw);
  }
}

template <typename scalar_t>
void launch_histogram(const at::Tensor& scores, bool abs_scores, int pass, counter_t* hist, counter_t* state,
                      cudaStream_t stream) {
  const int64_t n = scores.numel();
  if (n == 0) return;
  const auto* data = scores.const_data_ptr<scalar_t>();
  constexpr int V = 16 / sizeof(scalar_t);
  if (aligned(data, 16)) {
    radix_histogram_kernel<scalar_t, V><<<blocks_for(n / V, kHistThreads), kHistThreads, 0, stream>>>(
        data, n, abs_scores, pass, hist, state);
  } else {
    radix_histogram_kernel<scalar_t, 1><<<blocks_for(n, kHistThreads), kHistThreads, 0, stream>>>(
        data, n, abs_scores, pass, hist, state);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor threshold_of(const std::vector<at::Tensor>& scores, double density, bool abs_scores) {
  TORCH_CHECK_VALUE(!scores.empty(), "scores must hold at least one tensor");
  const auto dtype = scores[0].scalar_type();
  const auto device = scores[0].device();
  std::vector<at::Tensor> contiguous;
  int64_t n = 0;
  for (size_t i = 0; i < scores.size(); ++i) {
    check_scores(scores[i]);
    TORCH_CHECK_TYPE(scores[i].scalar_type() == dtype, "scores must share one dtype, got ", dtype, " and ",
                     scores[i].scalar_type(), " (tensor ", i, ")");
    TORCH_CHECK_VALUE(scores[i].is_cuda() && scores[i].device() == device,
                      "scores must be CUDA tensors on one device, tensor 0 is on ", device, ", tensor ", i,
                      " on ", scores[i].device());
    contiguous.push_back(scores[i].contiguous());
    n += scores[i].numel();
  }
  const int64_t n_keep = n_keep_for(density, n);
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  auto out = at::empty({}, scores[0].options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "maskprune_threshold_cuda", [&] {
    constexpr int passes = radix_passes(KeyBits<scalar_t>::bits);
    // One zeroed buffer: a histogram per pass, then the select state.
    auto buffer = at::zeros({passes * kBins + kStateSlots}, scores[0].options().dtype(at::kLong));
    auto* base = reinterpret_cast<counter_t*>(buffer.data_ptr<int64_t>());
    counter_t* state = base + passes * kBins;
    for (int pass = 0; pass < passes; ++pass) {
      counter_t* hist = base + static_cast<int64_t>(pass) * kBins;
      for (const auto& s : contiguous) launch_histogram<scalar_t>(s, abs_scores, pass, hist, state, stream);
      radix_scan_kernel<scalar_t><<<1, 32, 0, stream>>>(hist, state, pass, n_keep, abs_scores,
                                                         out.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

// t = the n_keep-th largest key. Non-finite scores give t = NaN (the CPU kernel raises instead; raising
// here would need a host synchronisation, so maskprune/ops.py checks t on the device, torch._assert_async). The
// selection is fast enough on the GPU that the hint (used by the CPU kernel) is not needed here.
at::Tensor threshold_cuda(const at::Tensor& scores, double density, bool abs_scores,
                          const std::optional<at::Tensor>& hint) {
  check_hint(hint);
  return threshold_of({scores}, density, abs_scores);
}

at::Tensor global_threshold_cuda(at::TensorList scores, double density, bool abs_scores,
                                 const std::optional<at::Tensor>& hint) {
  check_hint(hint);
  return threshold_of(scores.vec(), density, abs_scores);
}

// ---------------------------------------------------------------------------------------------
// Elementwise passes. Each thread handles V consecutive elements per step (vector loads when every
// pointer is aligned to V elements), then the n % V leftovers one by one.

// out = W * 1[key >= t] (W times 0, so -0.0 for a negative weight, as the reference's W * M),
// cast to out_t; t is read from device memory.
template <typename score_t, typename weight_t, typename out_t, int V>
__global__ void __launch_bounds__(kElementwiseThreads)
    apply_mask_kernel(const weight_t* __restrict__ weight, const score_t* __restrict__ scores,
                      const score_t* __restrict__ t, bool abs_scores, out_t* __restrict__ out, int64_t n) {
  using acc_t = at::opmath_type<weight_t>;  // exact for W * 0 and W * 1
  const score_t thr = *t;
  auto masked = [&](weight_t w, score_t s) {
    const score_t key = abs_scores ? abs_of(s) : s;
    return static_cast<out_t>(static_cast<acc_t>(w) * (key >= thr ? acc_t(1) : acc_t(0)));
  };
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t n_vec = n / V;
  for (int64_t i = first; i < n_vec; i += stride) {
    const auto w = reinterpret_cast<const Vec<weight_t, V>*>(weight)[i];
    const auto s = reinterpret_cast<const Vec<score_t, V>*>(scores)[i];
    Vec<out_t, V> o;
#pragma unroll
    for (int k = 0; k < V; ++k) o.v[k] = masked(w.v[k], s.v[k]);
    reinterpret_cast<Vec<out_t, V>*>(out)[i] = o;
  }
  for (int64_t i = n_vec * V + first; i < n; i += stride) out[i] = masked(weight[i], scores[i]);
}

// out = sign(S) * (W * G) (W * G if not abs_scores), computed and written in the scores' dtype.
// No __restrict__: score_grad_ writes over grad_weight (each element is read, then written, by one thread).
template <typename score_t, typename weight_t, typename grad_t, int V>
__global__ void __launch_bounds__(kElementwiseThreads)
    score_grad_kernel(const grad_t* grad_weight, const weight_t* weight, const score_t* scores, bool abs_scores,
                      score_t* out, int64_t n) {
  auto grad = [&](grad_t g, weight_t w, score_t s) {
    const score_t v = static_cast<score_t>(w) * static_cast<score_t>(g);
    if (!abs_scores) return v;
    const score_t sign = score_t(s > score_t(0)) - score_t(s < score_t(0));
    return sign * v;
  };
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t n_vec = n / V;
  for (int64_t i = first; i < n_vec; i += stride) {
    const auto g = reinterpret_cast<const Vec<grad_t, V>*>(grad_weight)[i];
    const auto w = reinterpret_cast<const Vec<weight_t, V>*>(weight)[i];
    const auto s = reinterpret_cast<const Vec<score_t, V>*>(scores)[i];
    Vec<score_t, V> o;
#pragma unroll
    for (int k = 0; k < V; ++k) o.v[k] = grad(g.v[k], w.v[k], s.v[k]);
    reinterpret_cast<Vec<score_t, V>*>(out)[i] = o;
  }
  for (int64_t i = n_vec * V + first; i < n; i += stride) out[i] = grad(grad_weight[i], weight[i], scores[i]);
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), name, " must be a CUDA tensor here, got one on ", t.device());
}

at::Tensor apply_mask_cuda(const at::Tensor& weight, const at::Tensor& scores, const at::Tensor& t, bool abs_scores,
                           std::optional<at::ScalarType> dtype) {
  check_mask_args(weight, scores, t);
  check_cuda(scores, "scores");
  const auto out_dtype = dtype.value_or(weight.scalar_type());
  const c10::cuda::CUDAGuard guard(scores.device());
  auto w = weight.contiguous();
  auto s = scores.contiguous();
  auto out = at::empty(weight.sizes(), weight.options().dtype(out_dtype));
  const int64_t n = w.numel();
  if (n == 0) return out;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "maskprune_apply_mask_cuda_scores", [&] {
    using score_t = scalar_t;
    const auto* sp = s.const_data_ptr<score_t>();
    const auto* tp = t.const_data_ptr<score_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "maskprune_apply_mask_cuda_w", [&] {
      using weight_t = scalar_t;
      const auto* wp = w.const_data_ptr<weight_t>();
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "maskprune_apply_mask_cuda_out", [&] {
        auto* op = out.mutable_data_ptr<scalar_t>();
        constexpr int V = vec_width<score_t, weight_t, scalar_t>();
        if (aligned(sp, V * sizeof(score_t)) && aligned(wp, V * sizeof(weight_t)) &&
            aligned(op, V * sizeof(scalar_t))) {
          apply_mask_kernel<score_t, weight_t, scalar_t, V>
              <<<blocks_for(n / V, kElementwiseThreads), kElementwiseThreads, 0, stream>>>(wp, sp, tp, abs_scores,
                                                                                              op, n);
        } else {
          apply_mask_kernel<score_t, weight_t, scalar_t, 1>
              <<<blocks_for(n, kElementwiseThreads), kElementwiseThreads, 0, stream>>>(wp, sp, tp, abs_scores, op, n);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return out;
}

// The shared checks of csrc/checks.h, plus: the scores live on a CUDA device.
void check_score_grad_args_cuda(const at::Tensor& grad_weight, const at::Tensor& weight, const at::Tensor& scores) {
  check_score_grad_args(grad_weight, weight, scores);
  check_cuda(scores, "scores");
}

// dS into `out` (scores' dtype, contiguous, on the current device); `out` may alias `g`.
void score_grad_into(const at::Tensor& g, const at::Tensor& w, const at::Tensor& s, const at::Tensor& out,
                     bool abs_scores) {
  const int64_t n = s.numel();
  if (n == 0) return;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "maskprune_score_grad_cuda", [&] {
    using score_t = scalar_t;
    const auto* sp = s.const_data_ptr<score_t>();
    auto* op = out.mutable_data_ptr<score_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "maskprune_score_grad_cuda_w", [&] {
      using weight_t = scalar_t;
      const auto* wp = w.const_data_ptr<weight_t>();
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "maskprune_score_grad_cuda_g", [&] {
        const auto* gp = g.const_data_ptr<scalar_t>();
        constexpr int V = vec_width<score_t, weight_t, scalar_t>();
        if (aligned(sp, V * sizeof(score_t)) && aligned(op, V * sizeof(score_t)) &&
            aligned(wp, V * sizeof(weight_t)) && aligned(gp, V * sizeof(scalar_t))) {
          score_grad_kernel<score_t, weight_t, scalar_t, V>
              <<<blocks_for(n / V, kElementwiseThreads), kElementwiseThreads, 0, stream>>>(gp, wp, sp, abs_scores,
                                                                                              op, n);
        } else {
          score_grad_kernel<score_t, weight_t, scalar_t, 1>
              <<<blocks_for(n, kElementwiseThreads), kElementwiseThreads, 0, stream>>>(gp, wp, sp, abs_scores, op, n);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

at::Tensor score_grad_cuda(const at::Tensor& grad_weight, const at::Tensor& weight, const at::Tensor& scores,
                           bool abs_scores) {
  check_score_grad_args_cuda(grad_weight, weight, scores);
  const c10::cuda::CUDAGuard guard(scores.device());
  auto s = scores.contiguous();
  auto out = at::empty(s.sizes(), s.options());
  score_grad_into(grad_weight.contiguous(), weight.contiguous(), s, out, abs_scores);
  return out;
}

// In-place variant for a freshly computed weight gradient: saves one weight-sized buffer per step.
// Schema: score_grad_(Tensor(a!) grad_weight, ...) -> () (the same C++ signature as the CPU kernel's).
void score_grad_inplace_cuda(at::Tensor& grad_weight, const at::Tensor& weight, const at::Tensor& scores,
                             bool abs_scores) {
  check_score_grad_inplace_args(grad_weight, weight, scores);
  check_cuda(scores, "scores");
  const c10::cuda::CUDAGuard guard(scores.device());
  score_grad_into(grad_weight, weight.contiguous(), scores.contiguous(), grad_weight, abs_scores);
}

}  // namespace

TORCH_LIBRARY_IMPL(maskprune, CUDA, m) {
  m.impl("threshold", &threshold_cuda);
  m.impl("global_threshold", &global_threshold_cuda);
  m.impl("apply_mask", &apply_mask_cuda);
  m.impl("score_grad", &score_grad_cuda);
  m.impl("score_grad_", &score_grad_inplace_cuda);
}

}  // namespace maskprune
