// Fused masked GEMMs: the CUDA kernels of maskprune::masked_linear and maskprune::masked_linear_backward.
// Registered for the CUDA key, they take precedence over the device-generic composites of
// masked_linear.cpp (apply_mask + cuBLAS) and keep their semantics (DESIGN §1, §3):
//
//   forward   Y  = X (W ⊙ M)^T (+ b)            [M_rows x out]   in x's dtype
//   backward  dX = dY (W ⊙ M)                   [M_rows x in]    in x's dtype
//             dS = sign(S) ⊙ W ⊙ (dY^T X)       [out x in]       in the scores' dtype (W ⊙ (dY^T X) if !abs_scores)
//
// with M = 1[|S| >= t] (1[S >= t] if !abs_scores). All three are one kernel, C = A·B over a tile grid:
//  - operands are read straight from global memory with their own strides (any strides; stride 0 too,
//    as `.sum().backward()` gives) and their own dtype (a weight may differ from x's dtype), converted
//    to the compute dtype on the way into shared memory;
//  - a masked operand (W, with S and t) is masked in registers while its tile is loaded, so W ⊙ M
//    exists only in shared memory, never in global memory;
//  - out-of-range rows/columns of a tile are loaded as zeros (boundary predicates: any M, N, K);
//  - the epilogue either stores C (+ bias) in the compute dtype, or multiplies by sign(S) ⊙ W and
//    stores dS in the scores' dtype (the dS GEMM's output never exists unmasked in global memory).
//
// Compute paths, chosen by x's dtype:
//  - float16 / bfloat16: tensor cores through WMMA (mma.sync, 16x16x16 fragments), float32
//    accumulation; block tile 64x64x32, 4 warps, each a 32x32 sub-tile. Needs sm_80+.
//  - float32 / float64: a SIMT path (plain FMA in the dtype itself; IEEE float32, no TF32, so float32
//    results stay as exact as cuBLAS's default); block tile 64x64x16, 256 threads, 4x4 per thread.
// One kernel per compute dtype covers all three GEMMs and every input dtype (dtypes of the operands
// are runtime codes with warp-uniform branches), which keeps the build to 4 kernel instantiations.
//
// Rounding matches the composite path: a masked weight is W converted to float (float64 on the
// float64 path) times 1 or 0, then rounded to the compute dtype, as apply_mask(..., dtype=x.dtype)
// followed by the GEMM; grad_out is rounded to x's dtype as the composite's grad_out.to(x.dtype);
// bias is rounded to x's dtype and added to the float32 accumulator. dS differs on purpose in one
// place: dY^T X stays in the float32 accumulator instead of being rounded to x's dtype first.
//
// Simple by design (it was written without a GPU to run it on): scalar loads, no software pipelining.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>
#include <limits>
#include <vector>

#include "../checks.h"

namespace maskprune {
namespace {

// Runtime dtype codes of the operands.
enum DTypeCode : int { kCodeHalf = 0, kCodeBFloat16 = 1, kCodeFloat = 2, kCodeDouble = 3 };

bool has_code(at::ScalarType s) {
  return s == at::kHalf || s == at::kBFloat16 || s == at::kFloat || s == at::kDouble;
}

int code_of(at::ScalarType s) {
  switch (s) {
    case at::kHalf: return kCodeHalf;
    case at::kBFloat16: return kCodeBFloat16;
    case at::kFloat: return kCodeFloat;
    case at::kDouble: return kCodeDouble;
    default: TORCH_CHECK_TYPE(false, "maskprune masked GEMM: unsupported dtype ", s);
  }
  return kCodeFloat;
}

// One GEMM operand: element (r, c) is data[r * stride_r + c * stride_c]. For A, (r, c) = (m, k);
// for B, (r, c) = (k, n). A masked operand is multiplied by 1[key(S(r, c)) >= t] as it is loaded.
struct Operand {
  const void* data;
  int64_t stride_r, stride_c;
  int dtype;
  bool masked;
  bool abs_scores;
  int scores_dtype;  // kCodeFloat or kCodeDouble
  const void* scores;
  int64_t scores_stride_r, scores_stride_c;
  const void* t;  // 0-d, the scores' dtype
};

enum EpilogueKind : int { kStoreOut = 0, kStoreScoreGrad = 1 };

// kStoreOut:        out[m * ld_out + n] = C(m, n) (+ bias[n * bias_stride]), in the compute dtype.
// kStoreScoreGrad:  out[m * ld_out + n] = sign(S(m, n)) * W(m, n) * C(m, n), in the scores' dtype.
struct Epilogue {
  int kind;
  void* out;
  int64_t ld_out;
  const void* bias;  // in the compute dtype, or nullptr
  int64_t bias_stride;
  const void* weight;
  int weight_dtype;
  int64_t weight_stride_r, weight_stride_c;
  const void* scores;
  int scores_dtype;
  int64_t scores_stride_r, scores_stride_c;
  bool abs_scores;
};

struct GemmParams {
  int64_t M, N, K;
  Operand a, b;
  Epilogue ep;
};

// ---------------------------------------------------------------------------------------------
// Element access and conversions (explicit intrinsics: torch builds with __CUDA_NO_HALF_CONVERSIONS__).

template <typename acc_t>
__device__ __forceinline__ acc_t load_as(const void* p, int dtype, int64_t i) {
  switch (dtype) {
    case kCodeHalf: return static_cast<acc_t>(__half2float(static_cast<const __half*>(p)[i]));
    case kCodeBFloat16: return static_cast<acc_t>(__bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]));
    case kCodeFloat: return static_cast<acc_t>(static_cast<const float*>(p)[i]);
    default: return static_cast<acc_t>(static_cast<const double*>(p)[i]);
  }
}

__device__ __forceinline__ void convert(float v, __half& o) { o = __float2half_rn(v); }
__device__ __forceinline__ void convert(float v, __nv_bfloat16& o) { o = __float2bfloat16_rn(v); }
__device__ __forceinline__ void convert(float v, float& o) { o = v; }
__device__ __forceinline__ void convert(double v, double& o) { o = v; }

__device__ __forceinline__ float widen(__half v) { return __half2float(v); }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ double widen(double v) { return v; }

// The threshold of a masked operand, as a double (exact for a float32 t).
__device__ __forceinline__ double threshold_value(const Operand& op) {
  return op.masked ? load_as<double>(op.t, op.scores_dtype, 0) : 0.0;
}

__device__ __forceinline__ bool kept(const Operand& op, int64_t r, int64_t c, double thr) {
  const int64_t i = r * op.scores_stride_r + c * op.scores_stride_c;
  if (op.scores_dtype == kCodeFloat) {
    const float s = static_cast<const float*>(op.scores)[i];
    return (op.abs_scores ? fabsf(s) : s) >= static_cast<float>(thr);
  }
  const double s = static_cast<const double*>(op.scores)[i];
  return (op.abs_scores ? fabs(s) : s) >= thr;
}

// Operand element (r, c) as load_t (float on the tensor-core path), masked when the operand is.
template <typename load_t>
__device__ __forceinline__ load_t load_operand(const Operand& op, int64_t r, int64_t c, double thr) {
  const load_t v = load_as<load_t>(op.data, op.dtype, r * op.stride_r + c * op.stride_c);
  if (!op.masked) return v;
  return v * (kept(op, r, c, thr) ? load_t(1) : load_t(0));  // W * M (NaN * 0 stays NaN, as W ⊙ M)
}

// Loads the ROWS x COLS tile at (r0, c0) of an operand of R x C elements into shared memory at
// smem[r * SR + c * SC], zeros outside the operand. Consecutive threads walk the operand's
// unit-stride dimension, so global loads coalesce whichever way the operand is laid out.
template <typename T, typename load_t, int ROWS, int COLS, int SR, int SC, int THREADS>
__device__ __forceinline__ void load_tile(T* smem, const Operand& op, double thr, int64_t r0, int64_t c0, int64_t R,
                                          int64_t C) {
  const bool rows_fast = op.stride_r == 1 && op.stride_c != 1;
#pragma unroll 4
  for (int e = threadIdx.x; e < ROWS * COLS; e += THREADS) {
    const int r = rows_fast ? e % ROWS : e / COLS;
    const int c = rows_fast ? e / ROWS : e % COLS;
    const int64_t gr = r0 + r, gc = c0 + c;
    load_t v = load_t(0);
    if (gr < R && gc < C) v = load_operand<load_t>(op, gr, gc, thr);
    convert(v, smem[r * SR + c * SC]);
  }
}

// Writes one element of C through the epilogue; T is the compute dtype, acc_t the accumulator's.
template <typename T, typename acc_t>
__device__ __forceinline__ void store_element(const Epilogue& ep, int64_t m, int64_t n, acc_t acc) {
  if (ep.kind == kStoreOut) {
    if (ep.bias != nullptr) acc += widen(static_cast<const T*>(ep.bias)[n * ep.bias_stride]);
    convert(acc, static_cast<T*>(ep.out)[m * ep.ld_out + n]);
    return;
  }
  // dS = sign(S) * (W * G) in the scores' dtype, as score_grad computes it from G = C.
  const int64_t wi = m * ep.weight_stride_r + n * ep.weight_stride_c;
  const int64_t si = m * ep.scores_stride_r + n * ep.scores_stride_c;
  if (ep.scores_dtype == kCodeFloat) {
    const float s = static_cast<const float*>(ep.scores)[si];
    float v = load_as<float>(ep.weight, ep.weight_dtype, wi) * static_cast<float>(acc);
    if (ep.abs_scores) v = (float(s > 0.0f) - float(s < 0.0f)) * v;
    static_cast<float*>(ep.out)[m * ep.ld_out + n] = v;
  } else {
    const double s = static_cast<const double*>(ep.scores)[si];
    double v = load_as<double>(ep.weight, ep.weight_dtype, wi) * static_cast<double>(acc);
    if (ep.abs_scores) v = (double(s > 0.0) - double(s < 0.0)) * v;
    static_cast<double*>(ep.out)[m * ep.ld_out + n] = v;
  }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core path (float16 / bfloat16 in, float32 accumulate).

constexpr int kTcBM = 64, kTcBN = 64, kTcBK = 32, kTcThreads = 128;
// Padded shared-memory leading dimensions: WMMA needs a multiple of 8 (16-bit) / 4 (float) elements
// and 32-byte aligned fragment pointers, which every fragment offset below keeps (rows step by 16).
constexpr int kTcLdA = kTcBK + 8;  // A tile, row-major [BM][BK]
constexpr int kTcLdB = kTcBN + 8;  // B tile, row-major [BK][BN]
constexpr int kTcLdC = kTcBN + 4;  // C tile, row-major [BM][BN], float

template <typename T>
__global__ void __launch_bounds__(kTcThreads) masked_gemm_wmma_kernel(const GemmParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  __shared__ __align__(128) T a_tile[kTcBM * kTcLdA];
  __shared__ __align__(128) T b_tile[kTcBK * kTcLdB];
  __shared__ __align__(128) float c_tile[kTcBM * kTcLdC];

  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTcBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kTcBN;
  const int warp = threadIdx.x / 32;
  const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;  // this warp's 32x32 sub-tile
  const double thr_a = threshold_value(p.a), thr_b = threshold_value(p.b);

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  for (int64_t k0 = 0; k0 < p.K; k0 += kTcBK) {
    load_tile<T, float, kTcBM, kTcBK, kTcLdA, 1, kTcThreads>(a_tile, p.a, thr_a, m0, k0, p.M, p.K);
    load_tile<T, float, kTcBK, kTcBN, kTcLdB, 1, kTcThreads>(b_tile, p.b, thr_b, k0, n0, p.K, p.N);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTcBK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a_frag[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b_frag[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a_frag[i], a_tile + (wm + i * 16) * kTcLdA + kk, kTcLdA);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b_frag[j], b_tile + kk * kTcLdB + wn + j * 16, kTcLdB);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a_frag[i], b_frag[j], acc[i][j]);
    }
    __syncthreads();  // the tiles are overwritten by the next iteration's loads
  }

#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(c_tile + (wm + i * 16) * kTcLdC + wn + j * 16, acc[i][j], kTcLdC, wmma::mem_row_major);
  __syncthreads();
  for (int e = threadIdx.x; e < kTcBM * kTcBN; e += kTcThreads) {
    const int r = e / kTcBN, c = e % kTcBN;
    const int64_t m = m0 + r, n = n0 + c;
    if (m < p.M && n < p.N) store_element<T, float>(p.ep, m, n, c_tile[r * kTcLdC + c]);
  }
#else
  CUDA_KERNEL_ASSERT(false && "maskprune: the float16/bfloat16 masked GEMM needs sm_80 or newer");
#endif
}

// ---------------------------------------------------------------------------------------------
// SIMT path (float32 / float64, FMA in the dtype itself).

constexpr int kSimtBM = 64, kSimtBN = 64, kSimtBK = 16, kSimtThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kSimtThreads) masked_gemm_simt_kernel(const GemmParams p) {
  __shared__ T a_tile[kSimtBK * kSimtBM];  // [BK][BM]: A transposed, so a thread's rows are one row apart
  __shared__ T b_tile[kSimtBK * kSimtBN];  // [BK][BN]

  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kSimtBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kSimtBN;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;  // thread owns rows ty + 16i, columns tx + 16j
  const double thr_a = threshold_value(p.a), thr_b = threshold_value(p.b);

  T acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = T(0);

  for (int64_t k0 = 0; k0 < p.K; k0 += kSimtBK) {
    load_tile<T, T, kSimtBM, kSimtBK, 1, kSimtBM, kSimtThreads>(a_tile, p.a, thr_a, m0, k0, p.M, p.K);
    load_tile<T, T, kSimtBK, kSimtBN, kSimtBN, 1, kSimtThreads>(b_tile, p.b, thr_b, k0, n0, p.K, p.N);
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kSimtBK; ++k) {
      T a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = a_tile[k * kSimtBM + ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = b_tile[k * kSimtBN + tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fma(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + ty + 16 * i;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t n = n0 + tx + 16 * j;
      if (m < p.M && n < p.N) store_element<T, T>(p.ep, m, n, acc[i][j]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Launchers.

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

void launch_gemm(const GemmParams& p, at::ScalarType compute, cudaStream_t stream) {
  if (p.M == 0 || p.N == 0) return;
  const bool tensor_cores = compute == at::kHalf || compute == at::kBFloat16;
  const int bm = tensor_cores ? kTcBM : kSimtBM, bn = tensor_cores ? kTcBN : kSimtBN;
  const int64_t grid_m = ceil_div(p.M, bm), grid_n = ceil_div(p.N, bn);
  TORCH_CHECK_VALUE(grid_m <= std::numeric_limits<int32_t>::max() && grid_n <= 65535,
                    "maskprune masked GEMM: shape too large (", p.M, " x ", p.N, ")");
  const dim3 grid(static_cast<unsigned>(grid_m), static_cast<unsigned>(grid_n));
  if (tensor_cores) {
    TORCH_CHECK(at::cuda::getCurrentDeviceProperties()->major >= 8,
                "maskprune: the float16/bfloat16 masked GEMM needs a GPU of compute capability 8.0 or newer");
  }
  switch (compute) {
    case at::kHalf: masked_gemm_wmma_kernel<__half><<<grid, kTcThreads, 0, stream>>>(p); break;
    case at::kBFloat16: masked_gemm_wmma_kernel<__nv_bfloat16><<<grid, kTcThreads, 0, stream>>>(p); break;
    case at::kFloat: masked_gemm_simt_kernel<float><<<grid, kSimtThreads, 0, stream>>>(p); break;
    case at::kDouble: masked_gemm_simt_kernel<double><<<grid, kSimtThreads, 0, stream>>>(p); break;
    default: TORCH_CHECK_TYPE(false, "maskprune masked GEMM: unsupported compute dtype ", compute);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

Operand plain_operand(const at::Tensor& t, int64_t stride_r, int64_t stride_c) {
  Operand op{};
  op.data = t.const_data_ptr();
  op.dtype = code_of(t.scalar_type());
  op.stride_r = stride_r;
  op.stride_c = stride_c;
  op.masked = false;
  return op;
}

// The masked weight as an operand; transposed = false: (r, c) = (out, in); true: (r, c) = (in, out).
Operand masked_operand(const at::Tensor& weight, const at::Tensor& scores, const at::Tensor& t, bool abs_scores,
                       bool transposed) {
  const int r = transposed ? 1 : 0, c = transposed ? 0 : 1;
  Operand op = plain_operand(weight, weight.stride(r), weight.stride(c));
  op.masked = true;
  op.abs_scores = abs_scores;
  op.scores = scores.const_data_ptr();
  op.scores_dtype = code_of(scores.scalar_type());
  op.scores_stride_r = scores.stride(r);
  op.scores_stride_c = scores.stride(c);
  op.t = t.const_data_ptr();
  return op;
}

Epilogue store_epilogue(at::Tensor& out, const at::Tensor& bias) {
  Epilogue ep{};
  ep.kind = kStoreOut;
  ep.out = out.mutable_data_ptr();
  ep.ld_out = out.stride(0);
  ep.bias = bias.defined() ? bias.const_data_ptr() : nullptr;
  ep.bias_stride = bias.defined() ? bias.stride(0) : 0;
  return ep;
}

// The shared checks of csrc/checks.h, plus: x on a CUDA device.
void check_linear_args_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scores,
                            const at::Tensor& t) {
  check_linear_args(x, weight, scores, t);
  TORCH_CHECK_VALUE(x.is_cuda(), "x must be a CUDA tensor here, got one on ", x.device());
}

// Rows of x seen as a matrix (the product of its leading dimensions), and that matrix (a view when
// the strides allow, else a copy: the kernels take any two strides, not any N-d layout).
at::Tensor as_matrix(const at::Tensor& x, int64_t cols) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) rows *= x.size(d);
  return x.reshape({rows, cols});
}

at::Tensor masked_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scores,
                              const at::Tensor& t, const std::optional<at::Tensor>& bias, bool abs_scores) {
  check_linear_args_cuda(x, weight, scores, t);
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    check_linear_bias(*bias, weight);
    b = bias->to(x.scalar_type());  // as the composite: the bias in x's dtype
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t out_features = weight.size(0), in_features = weight.size(1);
  const auto x2d = as_matrix(x, in_features);
  auto y = at::empty({x2d.size(0), out_features}, x.options());
  // Y[m, o] = sum_i X[m, i] * Weff[o, i]: A = X (m, k=i), B(k=i, n=o) = Weff[o, i].
  GemmParams p{};
  p.M = x2d.size(0);
  p.N = out_features;
  p.K = in_features;
  p.a = plain_operand(x2d, x2d.stride(0), x2d.stride(1));
  p.b = masked_operand(weight, scores, t, abs_scores, /*transposed=*/true);
  p.ep = store_epilogue(y, b);
  launch_gemm(p, x.scalar_type(), at::cuda::getCurrentCUDAStream());
  auto shape = x.sizes().vec();
  shape.back() = out_features;
  return y.view(shape);
}

std::tuple<at::Tensor, at::Tensor> masked_linear_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                                               const at::Tensor& weight, const at::Tensor& scores,
                                                               const at::Tensor& t, bool abs_scores,
                                                               bool need_grad_x, bool need_grad_scores,
                                                               const std::optional<at::Tensor>& /*signs: CPU only*/) {
  check_linear_args_cuda(x, weight, scores, t);
  check_linear_grad_out(grad_out, x, weight);
  const int64_t out_features = weight.size(0), in_features = weight.size(1);
  TORCH_CHECK_VALUE(grad_out.sizes().slice(0, x.dim() - 1) == x.sizes().slice(0, x.dim() - 1),
                    "grad_out's leading dimensions must equal x's, got ", grad_out.sizes(), " and ", x.sizes());
  at::Tensor grad_x = at::empty({0}, x.options());
  at::Tensor grad_scores = at::empty({0}, scores.options());
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // grad_out is read in its own dtype and rounded to x's on load; other dtypes are converted first.
  const auto g2d = as_matrix(has_code(grad_out.scalar_type()) ? grad_out : grad_out.to(x.scalar_type()), out_features);
  const auto x2d = as_matrix(x, in_features);
  const int64_t rows = x2d.size(0);

  if (need_grad_x) {
    // dX[m, i] = sum_o dY[m, o] * Weff[o, i]: A = dY (m, k=o), B(k=o, n=i) = Weff[o, i].
    auto dx = at::empty({rows, in_features}, x.options());
    GemmParams p{};
    p.M = rows;
    p.N = in_features;
    p.K = out_features;
    p.a = plain_operand(g2d, g2d.stride(0), g2d.stride(1));
    p.b = masked_operand(weight, scores, t, abs_scores, /*transposed=*/false);
    p.ep = store_epilogue(dx, at::Tensor());
    launch_gemm(p, x.scalar_type(), stream);
    grad_x = dx.view(x.sizes());
  }
  if (need_grad_scores) {
    // G[o, i] = sum_m dY[m, o] * X[m, i]: A(m=o, k=m) = dY[m, o], B(k=m, n=i) = X[m, i];
    // dS[o, i] = sign(S[o, i]) * W[o, i] * G[o, i] in the epilogue.
    auto ds = at::empty(scores.sizes(), scores.options());  // contiguous (out, in)
    GemmParams p{};
    p.M = out_features;
    p.N = in_features;
    p.K = rows;
    p.a = plain_operand(g2d, g2d.stride(1), g2d.stride(0));
    p.b = plain_operand(x2d, x2d.stride(0), x2d.stride(1));
    Epilogue& ep = p.ep;
    ep.kind = kStoreScoreGrad;
    ep.out = ds.mutable_data_ptr();
    ep.ld_out = in_features;
    ep.weight = weight.const_data_ptr();
    ep.weight_dtype = code_of(weight.scalar_type());
    ep.weight_stride_r = weight.stride(0);
    ep.weight_stride_c = weight.stride(1);
    ep.scores = scores.const_data_ptr();
    ep.scores_dtype = code_of(scores.scalar_type());
    ep.scores_stride_r = scores.stride(0);
    ep.scores_stride_c = scores.stride(1);
    ep.abs_scores = abs_scores;
    launch_gemm(p, x.scalar_type(), stream);
    grad_scores = ds;
  }
  return {grad_x, grad_scores};
}

}  // namespace

TORCH_LIBRARY_IMPL(maskprune, CUDA, m) {
  m.impl("masked_linear", &masked_linear_cuda);
  m.impl("masked_linear_backward", &masked_linear_backward_cuda);
}

}  // namespace maskprune
