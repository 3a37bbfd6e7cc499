// CPU kernels: radix-select threshold, the fused mask pass and the fused score-gradient pass.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <iterator>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "buffer_pool.h"
#include "avx512_mask_pass.h"
#include "score_signs.h"
#include "sse_mask_pass.h"

namespace maskprune {
namespace {

constexpr int kRadixBits = 16;
constexpr int64_t kBins = int64_t{1} << kRadixBits;
constexpr int64_t kGrain = 1 << 15;

template <typename scalar_t>
using key_t = typename KeyBits<scalar_t>::type;

template <typename scalar_t, bool kAbs>
inline key_t<scalar_t> key_of(scalar_t v) {
  using K = KeyBits<scalar_t>;
  typename K::type raw;
  std::memcpy(&raw, &v, sizeof(raw));
  return encode_key<typename K::type, K::sign>(raw, kAbs);
}

// Below this many scores a plain nth_element over a copy of the keys beats the histogram passes.
constexpr int64_t kSmallSelect = 1 << 14;
// Pass 2 tests blocks of this many keys with a vectorisable "any match" before gathering them.
constexpr int64_t kGatherBlock = 64;
// The hinted pass counts blocks of this many keys branch-free and gathers only blocks with a key
// inside its window (a fraction of a percent of the keys, so few blocks).
constexpr int64_t kWindowBlock = 64;
// Gather buffers above this many keys per thread are freed after the call instead of kept.
constexpr size_t kKeepCapacity = size_t{1} << 20;

// Number of keys whose radix prefix marks NaN/inf: the exponent bits all lie inside the prefix.
template <typename scalar_t, bool kAbs>
int64_t count_nonfinite(const std::vector<int64_t>& merged) {
  using K = KeyBits<scalar_t>;
  constexpr int shift = K::bits - kRadixBits;
  int64_t bad = 0;
  if (kAbs) {
    for (int64_t b = int64_t(K::exponent >> shift); b < kBins; ++b) bad += merged[b];
  } else {
    for (int64_t b = int64_t((K::sign | K::exponent) >> shift); b < kBins; ++b) bad += merged[b];
    for (int64_t b = 0; b <= int64_t((~(K::sign | K::exponent)) >> shift); ++b) bad += merged[b];
  }
  return bad;
}

// The n_keep-th largest key over several contiguous arrays: one histogram pass over the top
// kRadixBits of every key (32-bit per-thread counters, so the pass runs at memory speed), then a
// blocked gather of the keys that share the chosen prefix and an nth_element over those few.
template <typename scalar_t, bool kAbs>
scalar_t select_threshold(const std::vector<at::Tensor>& tensors, int64_t n, int64_t n_keep) {
  using K = KeyBits<scalar_t>;
  using U = typename K::type;
  constexpr int shift = K::bits - kRadixBits;
  const int threads = at::get_num_threads();
  auto to_value = [](U key) {
    const U raw = decode_key<U, K::sign>(key, kAbs);
    scalar_t value;
    std::memcpy(&value, &raw, sizeof(value));
    return value;
  };

  if (n <= kSmallSelect) {  // small layers: one copy, one selection
    std::vector<U> keys;
    keys.reserve(n);
    for (const auto& t : tensors) {
      const scalar_t* data = t.data_ptr<scalar_t>();
      for (int64_t i = 0; i < t.numel(); ++i) {
        U raw;
        std::memcpy(&raw, &data[i], sizeof(raw));
        TORCH_CHECK_VALUE((raw & K::exponent) != K::exponent, "scores must be finite, found NaN or inf");
        keys.push_back(key_of<scalar_t, kAbs>(data[i]));
      }
    }
    auto nth = keys.begin() + (n_keep - 1);
    std::nth_element(keys.begin(), nth, keys.end(), std::greater<U>());
    return to_value(*nth);
  }

  // Pass 1: one uint32 histogram of the key prefix per thread. The buffers belong to the calling
  // thread and live across calls (no allocation or page faults on the hot path; the workers get a
  // plain pointer, never the thread_local itself). Slices of < 2^31 keys keep the counters exact.
  static thread_local std::vector<uint32_t> counts;
  static thread_local std::vector<int64_t> merged;
  counts.assign(static_cast<size_t>(threads) * kBins, 0u);
  merged.assign(kBins, 0);
  uint32_t* const counts_base = counts.data();
  auto flush = [&] {
    for (int tid = 0; tid < threads; ++tid) {
      uint32_t* c = counts_base + static_cast<size_t>(tid) * kBins;
      for (int64_t b = 0; b < kBins; ++b) merged[b] += c[b];
      std::fill(c, c + kBins, 0u);
    }
  };
  constexpr int64_t kSlice = int64_t{1} << 31;
  int64_t since_flush = 0;
  for (const auto& t : tensors) {
    const scalar_t* data = t.data_ptr<scalar_t>();
    for (int64_t s0 = 0; s0 < t.numel(); s0 += kSlice) {
      const int64_t s1 = std::min(t.numel(), s0 + kSlice);
      if (since_flush + (s1 - s0) >= kSlice) {
        flush();
        since_flush = 0;
      }
      at::parallel_for(s0, s1, kGrain, [&](int64_t begin, int64_t end) {
        uint32_t* c = counts_base + static_cast<size_t>(at::get_thread_num()) * kBins;
        for (int64_t i = begin; i < end; ++i) c[key_of<scalar_t, kAbs>(data[i]) >> shift] += 1;
      });
      since_flush += s1 - s0;
    }
  }
  flush();
  const int64_t bad = count_nonfinite<scalar_t, kAbs>(merged);
  TORCH_CHECK_VALUE(bad == 0, "scores must be finite, found ", bad, " NaN or inf value(s)");

  // Walk the histogram from the top to the bin that holds the n_keep-th largest key.
  int64_t above = 0, bin = kBins - 1;
  for (; bin >= 0; --bin) {
    if (above + merged[bin] >= n_keep) break;
    above += merged[bin];
  }
  TORCH_INTERNAL_ASSERT(bin >= 0, "radix select ran out of bins");
  const U prefix = static_cast<U>(bin);

  // Pass 2: gather the keys of that bin. Most blocks hold none, and the test of a whole block
  // vectorises, so the pass costs about one read of the scores.
  std::vector<std::vector<U>> gathered(threads);
  for (const auto& t : tensors) {
    const scalar_t* data = t.data_ptr<scalar_t>();
    at::parallel_for(0, t.numel(), kGrain, [&](int64_t begin, int64_t end) {
      auto& out = gathered[at::get_thread_num()];
      for (int64_t b0 = begin; b0 < end; b0 += kGatherBlock) {
        const int64_t b1 = std::min(end, b0 + kGatherBlock);
        int any = 0;
        for (int64_t i = b0; i < b1; ++i) any |= (key_of<scalar_t, kAbs>(data[i]) >> shift) == prefix;
        if (!any) continue;
        for (int64_t i = b0; i < b1; ++i) {
          const U key = key_of<scalar_t, kAbs>(data[i]);
          if ((key >> shift) == prefix) out.push_back(key);
        }
      }
    });
  }
  std::vector<U> candidates;
  for (auto& g : gathered) candidates.insert(candidates.end(), g.begin(), g.end());
  const int64_t rank = n_keep - above;  // 1-based rank of the answer among the candidates, largest first
  TORCH_INTERNAL_ASSERT(rank >= 1 && rank <= static_cast<int64_t>(candidates.size()));
  auto nth = candidates.begin() + (rank - 1);
  std::nth_element(candidates.begin(), nth, candidates.end(), std::greater<U>());
  return to_value(*nth);
}

// The same n_keep-th largest key, found near a hint (the threshold of the previous optimizer step,
// which moves by ~0.05% per step in edge-popup training): one vectorisable pass counts the keys above
// a narrow window around the hint and gathers the few inside it; an nth_element over those finishes.
// Returns nullopt when the answer lies outside the window (the caller widens it or runs the full select).
struct WindowCount {
  int64_t above = 0, bad = 0;  // keys >= hi, non-finite keys
};

// The order of the radix select's keys on finite values: by value, and +0.0 above -0.0 (which compare
// equal as floats), so that a threshold found in a window has the bits the full select would give.
template <typename T>
bool key_greater(T a, T b) {
  return a > b || (a == b && std::signbit(b) && !std::signbit(a));
}

// One slice [begin, end) of the window pass: whole blocks of kWindowBlock keys are counted branch-free
// (this vectorises); the few blocks with a key inside [lo, hi) are gathered branch-free into `out`.
// `out` is a buffer whose first `used` entries are this thread's keys so far; it only grows.
template <typename scalar_t, bool kAbs>
void window_pass(const scalar_t* __restrict__ data, int64_t begin, int64_t end, scalar_t lo, scalar_t hi,
                 std::vector<scalar_t>& out, size_t& used, WindowCount& count) {
  const scalar_t big = std::numeric_limits<scalar_t>::max();
  auto key_at = [&](int64_t i) { return kAbs ? std::abs(data[i]) : data[i]; };
  int64_t above = 0, bad = 0, i0 = begin;
  for (; i0 + kWindowBlock <= end; i0 += kWindowBlock) {
    int32_t block_above = 0, block_bad = 0, inside = 0;
    for (int64_t i = i0; i < i0 + kWindowBlock; ++i) {
      const scalar_t key = key_at(i);
      block_above += key >= hi;
      block_bad += !(std::abs(data[i]) <= big);  // NaN and inf
      inside += (key >= lo) & (key < hi);
    }
    above += block_above;
    bad += block_bad;
    if (inside == 0) continue;
    if (out.size() < used + kWindowBlock) out.resize(2 * (used + kWindowBlock));
    scalar_t* o = out.data() + used;
    int64_t j = 0;
    for (int64_t i = i0; i < i0 + kWindowBlock; ++i) {
      const scalar_t key = key_at(i);
      o[j] = key;
      j += (key >= lo) & (key < hi);
    }
    used += j;
  }
  for (int64_t i = i0; i < end; ++i) {
    const scalar_t key = key_at(i);
    above += key >= hi;
    bad += !(std::abs(data[i]) <= big);
    if (key >= lo && key < hi) {
      if (out.size() < used + 1) out.resize(2 * (used + 1));
      out[used++] = key;
    }
  }
  count.above += above;
  count.bad += bad;
}

// Releases the per-thread buffers that grew past kKeepCapacity (a window over a crowd of equal keys).
template <typename T>
void release_large(std::vector<std::vector<T>>& buffers) {
  for (auto& b : buffers) {
    if (b.size() > kKeepCapacity) std::vector<T>().swap(b);
  }
}

// The threads' window counts summed: (keys above the window, keys inside it) when the n_keep-th largest key
// lies inside the window; nullopt (buffers released) when it does not; raises on NaN/inf keys.
template <typename T>
std::optional<std::pair<int64_t, int64_t>> window_totals(const std::vector<WindowCount>& counts,
                                                         const std::vector<size_t>& used, int64_t n_keep,
                                                         std::vector<std::vector<T>>& buffers) {
  int64_t bad = 0, above = 0, inside = 0;
  for (size_t tid = 0; tid < counts.size(); ++tid) {
    bad += counts[tid].bad;
    above += counts[tid].above;
    inside += static_cast<int64_t>(used[tid]);
  }
  if (bad != 0 || n_keep <= above || n_keep > above + inside) {
    release_large(buffers);
    TORCH_CHECK_VALUE(bad == 0, "scores must be finite, found ", bad, " NaN or inf value(s)");
    return std::nullopt;
  }
  return std::make_pair(above, inside);
}

template <typename scalar_t, bool kAbs>
std::optional<scalar_t> select_in_window(const std::vector<at::Tensor>& tensors, int64_t n_keep, scalar_t lo,
                                         scalar_t hi) {
  const int threads = at::get_num_threads();
  std::vector<WindowCount> counts(threads);
  std::vector<size_t> used(threads, 0);
  // Per-thread gather buffers that live across calls (no allocation on the hot path); one that grew
  // past kKeepCapacity keys (a window over a crowd of equal keys) is released after the call.
  static thread_local std::vector<std::vector<scalar_t>> gathered;
  if (gathered.size() < static_cast<size_t>(threads)) gathered.resize(threads);
  auto* const gathered_base = gathered.data();
  for (const auto& t : tensors) {
    const scalar_t* data = t.data_ptr<scalar_t>();
    at::parallel_for(0, t.numel(), kGrain, [&](int64_t begin, int64_t end) {
      const int tid = at::get_thread_num();
#if defined(MASKPRUNE_AVX512_MASK_PASS)
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (avx512::enabled()) {
          avx512::window_count_range<kAbs>(data, begin, end, lo, hi, gathered_base[tid], used[tid],
                                           counts[tid].above, counts[tid].bad);
          return;
        }
      }
#endif
      window_pass<scalar_t, kAbs>(data, begin, end, lo, hi, gathered_base[tid], used[tid], counts[tid]);
    });
  }
  const auto totals = window_totals(counts, used, n_keep, gathered);
  if (!totals) return std::nullopt;
  const auto [above, inside] = *totals;
  std::vector<scalar_t> candidates;
  candidates.reserve(inside);
  for (int tid = 0; tid < threads; ++tid) {
    candidates.insert(candidates.end(), gathered[tid].begin(), gathered[tid].begin() + used[tid]);
  }
  release_large(gathered);
  auto nth = candidates.begin() + (n_keep - above - 1);
  std::nth_element(candidates.begin(), nth, candidates.end(), key_greater<scalar_t>);
  return *nth;
}

// Windows hint +- scale * 2^-k tried in turn: the narrow one holds ~0.2% of the keys of a layer whose
// scores are spread evenly; the wide one catches a threshold that moved by up to 3% in a step.
constexpr int kWindowLog2[] = {9, 5};
// Scores read (evenly strided) to estimate their magnitude for the window's scale.
constexpr int64_t kScaleSample = 1024;

// Sum and count of |s| over an evenly strided sample of at most kScaleSample finite entries.
template <typename scalar_t>
void sample_magnitude(const scalar_t* data, int64_t n, double& sum, int64_t& count) {
  const int64_t stride = std::max<int64_t>(1, n / kScaleSample);
  for (int64_t i = 0; i < n; i += stride) {
    const double v = std::abs(static_cast<double>(data[i]));
    if (v <= std::numeric_limits<double>::max()) {  // NaN and inf are the passes' to report
      sum += v;
      count += 1;
    }
  }
}

// The scale of the window around a hint: |hint|, or the scores' mean magnitude when that is larger. A
// window relative to |hint| alone is too narrow when the threshold lies near 0 (raw scores at density
// ~0.5, |S| at density near 1), where t moves by more than |hint| * 2^-9 in a step and the window
// would miss on every step.
template <typename scalar_t>
scalar_t window_scale(scalar_t hint, double sum, int64_t count) {
  const double mean = count > 0 ? sum / static_cast<double>(count) : 0.0;
  return std::max(std::abs(hint), static_cast<scalar_t>(mean));
}

template <typename scalar_t, bool kAbs>
std::optional<scalar_t> select_near_hint(const std::vector<at::Tensor>& tensors, int64_t n_keep, scalar_t hint,
                                         int first_window) {
  double sum = 0.0;
  int64_t count = 0;
  for (const auto& t : tensors) sample_magnitude(t.data_ptr<scalar_t>(), t.numel(), sum, count);
  const scalar_t scale = window_scale(hint, sum, count);
  for (int k = first_window; k < static_cast<int>(std::size(kWindowLog2)); ++k) {
    const scalar_t half = scale * std::ldexp(scalar_t(1), -kWindowLog2[k]);
    if (!(half > 0)) return std::nullopt;
    auto found = select_in_window<scalar_t, kAbs>(tensors, n_keep, hint - half, hint + half);
    if (found) return found;
  }
  return std::nullopt;
}

// The hint as a scores-dtype value, or nullopt when it cannot be a key of such scores (not finite in
// their dtype, or <= 0 for |S| keys) or lies on another device (reading it would wait for that device):
// then the full select runs. A hint is only a starting point; the result never depends on it.
template <typename scalar_t>
std::optional<scalar_t> usable_hint(const std::optional<at::Tensor>& hint, bool abs_scores) {
  if (!hint.has_value() || !hint->defined() || !hint->device().is_cpu()) return std::nullopt;
  const double value = hint->item<double>();
  const bool usable = std::abs(value) <= std::numeric_limits<scalar_t>::max() &&
                      !(abs_scores && !(value > 0));  // the comparisons are false for NaN
  return usable ? std::optional<scalar_t>(static_cast<scalar_t>(value)) : std::nullopt;
}

// `first_window` > 0 skips windows already searched (by threshold_and_mask's fused pass).
at::Tensor threshold_of(const std::vector<at::Tensor>& scores, double density, bool abs_scores,
                        const std::optional<at::Tensor>& hint, int first_window = 0) {
  TORCH_CHECK_VALUE(!scores.empty(), "scores must hold at least one tensor");
  const auto dtype = scores[0].scalar_type();
  std::vector<at::Tensor> contiguous;
  int64_t n = 0;
  for (size_t i = 0; i < scores.size(); ++i) {
    check_scores(scores[i]);
    TORCH_CHECK_TYPE(scores[i].scalar_type() == dtype, "scores must share one dtype, got ", dtype,
                     " and ", scores[i].scalar_type(), " (tensor ", i, ")");
    TORCH_CHECK_VALUE(scores[i].device().is_cpu(), "scores must be CPU tensors here, tensor ", i,
                      " is on ", scores[i].device());
    contiguous.push_back(scores[i].contiguous());
    n += scores[i].numel();
  }
  const int64_t n_keep = n_keep_for(density, n);
  check_hint(hint);
  return AT_DISPATCH_FLOATING_TYPES(dtype, "maskprune_threshold", [&] {
    std::optional<scalar_t> near;
    if (const auto h = usable_hint<scalar_t>(hint, abs_scores)) {
      near = abs_scores ? select_near_hint<scalar_t, true>(contiguous, n_keep, *h, first_window)
                        : select_near_hint<scalar_t, false>(contiguous, n_keep, *h, first_window);
    }
    const scalar_t t = near ? *near
                       : abs_scores ? select_threshold<scalar_t, true>(contiguous, n, n_keep)
                                    : select_threshold<scalar_t, false>(contiguous, n, n_keep);
    return at::scalar_tensor(t, at::TensorOptions().dtype(dtype));
  });
}

at::Tensor threshold_cpu(const at::Tensor& scores, double density, bool abs_scores,
                         const std::optional<at::Tensor>& hint) {
  return threshold_of({scores}, density, abs_scores, hint);
}

at::Tensor global_threshold_cpu(at::TensorList scores, double density, bool abs_scores,
                                const std::optional<at::Tensor>& hint) {
  return threshold_of(scores.vec(), density, abs_scores, hint);
}

// Whether a mask pass writes its output of `bytes` with streaming stores (past the caches): only outputs
// larger than a core's L2, which the GEMM reading them next would find in memory anyway. Streaming a
// smaller one (LeNet-300's 0.9 MB first layer) made the next GEMM read it from memory (a lenet300 epoch
// went from 1.23x to 1.30x the dense one).
constexpr size_t kStreamMinBytes = size_t{4} << 20;
inline bool streams(size_t bytes) { return bytes >= kStreamMinBytes; }

// Every mask pass writes an entry of W ⊙ M as w * keep with keep = 1 or 0 in this type (so a dropped
// negative weight is -0.0): double when either side is double, so that kept float64 weights pass through
// exactly. The product is written out in each loop, branch-free: a helper taking a bool was not
// vectorised (the mask pass took 9x longer).
template <typename weight_t, typename out_t>
using mask_acc_t = std::conditional_t<std::is_same_v<weight_t, double> || std::is_same_v<out_t, double>, double, float>;

// The loops below are written branch-free over restrict pointers, one instantiation per
// (dtype, abs_scores) pair, so that the compiler vectorises them: both passes are memory-bound.
template <typename score_t, typename weight_t, typename out_t, bool kAbs>
void mask_loop(const weight_t* __restrict__ w, const score_t* __restrict__ s, out_t* __restrict__ out,
               score_t thr, int64_t begin, int64_t end, [[maybe_unused]] bool stream) {
#if defined(MASKPRUNE_SSE2_MASK_PASS)
  if constexpr (std::is_same_v<score_t, float> && std::is_same_v<weight_t, float> && std::is_same_v<out_t, float>) {
    sse::mask_range<kAbs>(w, s, out, thr, begin, end, stream);
    return;
  }
#endif
  using acc_t = mask_acc_t<weight_t, out_t>;
  for (int64_t i = begin; i < end; ++i) {
    const score_t key = kAbs ? std::abs(s[i]) : s[i];
    const acc_t keep = key >= thr ? acc_t(1) : acc_t(0);
    out[i] = static_cast<out_t>(static_cast<acc_t>(w[i]) * keep);
  }
}

template <typename score_t, typename weight_t, typename grad_t, bool kAbs>
void score_grad_loop(const grad_t* g, const weight_t* __restrict__ w, const score_t* __restrict__ s,
                     score_t* out, int64_t begin, int64_t end) {  // out may alias g (score_grad_)
  for (int64_t i = begin; i < end; ++i) {
    const score_t v = static_cast<score_t>(w[i]) * static_cast<score_t>(g[i]);
    if constexpr (kAbs) {
      const score_t sign = (s[i] > score_t(0) ? score_t(1) : score_t(0)) - (s[i] < score_t(0) ? score_t(1) : score_t(0));
      out[i] = sign * v;
    } else {
      out[i] = v;
    }
  }
}

// W ⊙ 1[key >= t] into `out` (contiguous, the weight's shape); w and s contiguous.
void mask_into(const at::Tensor& w, const at::Tensor& s, const at::Tensor& t, bool abs_scores, at::Tensor& out) {
  const auto out_dtype = out.scalar_type();
  const bool stream = streams(out.nbytes());
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "maskprune_apply_mask_scores", [&] {
    using score_t = scalar_t;
    const score_t thr = t.item<score_t>();
    const score_t* sp = s.data_ptr<score_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "maskprune_apply_mask_w", [&] {
      using weight_t = scalar_t;
      const weight_t* wp = w.data_ptr<weight_t>();
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "maskprune_apply_mask_out", [&] {
        scalar_t* op = out.data_ptr<scalar_t>();
        at::parallel_for(0, w.numel(), kGrain, [&](int64_t begin, int64_t end) {
          if (abs_scores) mask_loop<score_t, weight_t, scalar_t, true>(wp, sp, op, thr, begin, end, stream);
          else mask_loop<score_t, weight_t, scalar_t, false>(wp, sp, op, thr, begin, end, stream);
        });
      });
    });
  });
}

at::Tensor apply_mask_cpu(const at::Tensor& weight, const at::Tensor& scores, const at::Tensor& t,
                          bool abs_scores, std::optional<at::ScalarType> dtype) {
  check_mask_args(weight, scores, t);
  auto out = pooled_empty(weight.sizes(), weight.options().dtype(dtype.value_or(weight.scalar_type())));
  mask_into(weight.contiguous(), scores.contiguous(), t, abs_scores, out);
  return out;
}

// ---------------------------------------------------------------------------------------------
// threshold_and_mask: the threshold's window pass (see select_in_window) and the mask pass in one read of
// the scores. Keys above the window are kept and keys below it dropped whatever t is; the few inside it
// are written as dropped, their indices gathered, and corrected once t is known. When t is not inside
// the window, the ordinary threshold and mask pass run instead.

// A key inside the window of the fused pass: where it is, its value and its weight, so that the threshold
// and the correction of W ⊙ M after the pass need not read the scores or weights again (out of order, so
// each from DRAM). double holds every weight dtype exactly.
template <typename score_t>
struct InWindow {
  int64_t index;
  score_t key;
  double weight;
};

// Appends in-window keys to a per-thread buffer that only grows (its first `used` entries are this
// thread's so far).
template <typename score_t>
struct WindowGather {
  std::vector<InWindow<score_t>>& buffer;
  size_t used;
  void reserve(int64_t more) {
    if (buffer.size() < used + more) buffer.resize(2 * (used + more));
  }
  void operator()(int64_t index, score_t key, double weight) {  // one key, known to be inside
    reserve(1);
    buffer[used++] = {index, key, weight};
  }
};

// Whether the fused pass packs the scores' signs itself (the SSE2 float32 pass; else pack_signs runs after).
template <typename score_t, typename weight_t, typename out_t>
constexpr bool fused_signs =
#if defined(MASKPRUNE_SSE2_MASK_PASS)
    std::is_same_v<score_t, float> && std::is_same_v<weight_t, float> && std::is_same_v<out_t, float>;
#else
    false;
#endif

// One slice [begin, end): out = W * 1[key >= hi], the window counts, and the in-window keys gathered; with
// `signs` (only used where fused_signs) also the scores' sign bytes.
template <typename score_t, typename weight_t, typename out_t, bool kAbs>
void window_mask_pass(const weight_t* __restrict__ w, const score_t* __restrict__ s, out_t* __restrict__ out,
                      int64_t begin, int64_t end, score_t lo, score_t hi, WindowGather<score_t>& gather,
                      WindowCount& count, [[maybe_unused]] bool stream, uint8_t* signs) {
#if defined(MASKPRUNE_SSE2_MASK_PASS)
  if constexpr (fused_signs<score_t, weight_t, out_t>) {
#if defined(MASKPRUNE_AVX512_MASK_PASS)
    if (avx512::enabled() && is_aligned(out, 64) && begin % avx512::kLanes == 0) {
      avx512::window_mask_range<kAbs>(w, s, out, begin, end, lo, hi, count.above, count.bad, gather, stream, signs);
      return;
    }
#endif
    sse::window_mask_range<kAbs>(w, s, out, begin, end, lo, hi, count.above, count.bad, gather, stream, signs);
    return;
  }
#endif
  const score_t big = std::numeric_limits<score_t>::max();
  auto key_at = [&](int64_t i) { return kAbs ? std::abs(s[i]) : s[i]; };
  using acc_t = mask_acc_t<weight_t, out_t>;
  auto visit = [&](int64_t i, int32_t& above, int32_t& bad, int32_t& inside) {
    const score_t key = key_at(i);
    const acc_t keep = key >= hi ? acc_t(1) : acc_t(0);
    out[i] = static_cast<out_t>(static_cast<acc_t>(w[i]) * keep);  // as mask_loop writes it
    above += key >= hi;
    bad += !(std::abs(s[i]) <= big);  // NaN and inf
    inside += (key >= lo) & (key < hi);
  };
  auto gather_block = [&](int64_t i0, int64_t i1) {  // branch-free: every key written, the inside ones kept
    gather.reserve(i1 - i0);
    InWindow<score_t>* o = gather.buffer.data() + gather.used;
    int64_t j = 0;
    for (int64_t i = i0; i < i1; ++i) {
      const score_t key = key_at(i);
      o[j] = {i, key, static_cast<double>(w[i])};
      j += (key >= lo) & (key < hi);
    }
    gather.used += j;
  };
  // counted in locals and stored once: the threads' WindowCounts share a cache line
  int64_t total_above = 0, total_bad = 0, i0 = begin;
  for (; i0 + kWindowBlock <= end; i0 += kWindowBlock) {
    int32_t above = 0, bad = 0, inside = 0;
    for (int64_t i = i0; i < i0 + kWindowBlock; ++i) visit(i, above, bad, inside);
    total_above += above;
    total_bad += bad;
    if (inside != 0) gather_block(i0, i0 + kWindowBlock);
  }
  int32_t above = 0, bad = 0, inside = 0;
  for (int64_t i = i0; i < end; ++i) visit(i, above, bad, inside);
  if (inside != 0) gather_block(i0, end);
  count.above += total_above + above;
  count.bad += total_bad + bad;
}

// Per-thread buffers of the fused pass that live across calls (as select_in_window's), one set per scores
// dtype.
template <typename score_t>
std::vector<std::vector<InWindow<score_t>>>& in_window_buffers(int threads) {
  static thread_local std::vector<std::vector<InWindow<score_t>>> buffers;
  if (buffers.size() < static_cast<size_t>(threads)) buffers.resize(threads);
  return buffers;
}

// The fused pass near hint h (window h +- scale * 2^-kWindowLog2[0], see window_scale): t, or nullopt when t
// lies outside the window (then `out` holds no meaningful values). The threads take whole blocks of 16
// scores (four sign bytes, one AVX-512 vector); `signs`, when given, is filled where fused_signs and `out`
// is 16-byte aligned.
template <typename score_t, typename weight_t, typename out_t, bool kAbs>
std::optional<score_t> threshold_and_mask_near(const weight_t* w, const score_t* s, out_t* out, int64_t n,
                                               int64_t n_keep, score_t hint, uint8_t* signs, bool& pass_ran) {
  double sum = 0.0;
  int64_t count = 0;
  sample_magnitude(s, n, sum, count);
  const score_t half = window_scale(hint, sum, count) * std::ldexp(score_t(1), -kWindowLog2[0]);
  if (!(half > 0)) return std::nullopt;
  pass_ran = true;  // from here on `signs` is filled, whether t is inside the window or not
  const score_t lo = hint - half, hi = hint + half;
  const int threads = at::get_num_threads();
  std::vector<WindowCount> counts(threads);
  std::vector<size_t> used(threads, 0);
  auto& gathered = in_window_buffers<score_t>(threads);
  auto* const gathered_base = gathered.data();
  constexpr int64_t kSlice = 16;  // thread slices start at multiples of 16: whole sign bytes, aligned vectors
  const bool stream = streams(n * sizeof(out_t));
  at::parallel_for(0, (n + kSlice - 1) / kSlice, kGrain / kSlice, [&](int64_t slice_begin, int64_t slice_end) {
    const int tid = at::get_thread_num();
    const int64_t begin = kSlice * slice_begin, end = std::min(n, kSlice * slice_end);
    WindowGather<score_t> gather{gathered_base[tid], used[tid]};
    window_mask_pass<score_t, weight_t, out_t, kAbs>(w, s, out, begin, end, lo, hi, gather, counts[tid], stream,
                                                     signs);
    used[tid] = gather.used;
  });
  const auto totals = window_totals(counts, used, n_keep, gathered);
  if (!totals) return std::nullopt;
  const auto [above, inside] = *totals;
  std::vector<score_t> keys;
  keys.reserve(inside);
  for (int tid = 0; tid < threads; ++tid) {
    for (size_t j = 0; j < used[tid]; ++j) keys.push_back(gathered[tid][j].key);
  }
  auto nth = keys.begin() + (n_keep - above - 1);
  std::nth_element(keys.begin(), nth, keys.end(), key_greater<score_t>);
  const score_t t = *nth;
  // the in-window keys >= t are kept after all: each thread's own entries, in parallel (they are scattered
  // over the weight, so each is a cache miss)
  at::parallel_for(0, threads, 1, [&](int64_t first, int64_t last) {
    using acc_t = mask_acc_t<weight_t, out_t>;
    for (int64_t tid = first; tid < last; ++tid) {
      for (size_t j = 0; j < used[tid]; ++j) {
        const auto& e = gathered_base[tid][j];
        if (e.key >= t) out[e.index] = static_cast<out_t>(static_cast<acc_t>(e.weight) * acc_t(1));
      }
    }
  });
  release_large(gathered);
  return t;
}

// sign bytes (score_signs.h) of contiguous scores, one pass over whole quads.
void pack_signs(const at::Tensor& s, uint8_t* signs) {
  const int64_t n = s.numel();
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "maskprune_pack_signs", [&] {
    const scalar_t* sp = s.data_ptr<scalar_t>();
    at::parallel_for(0, (n + 3) / 4, kGrain / 4, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) signs[q] = sign_byte(sp + 4 * q, std::min<int64_t>(4, n - 4 * q));
    });
  });
}

// threshold_and_mask, and with `signs` (a buffer of (n + 3) / 4 bytes) the scores' sign bytes too: packed by
// the fused pass where it can, else by a pass of their own.
std::tuple<at::Tensor, at::Tensor> threshold_and_mask_into(const at::Tensor& weight, const at::Tensor& scores,
                                                           double density, bool abs_scores,
                                                           const std::optional<at::Tensor>& hint,
                                                           std::optional<at::ScalarType> dtype, uint8_t* signs) {
  check_float(weight, "weight");
  check_scores(scores);
  TORCH_CHECK_VALUE(weight.sizes() == scores.sizes(), "scores must have the weight's shape ", weight.sizes(),
                    ", got ", scores.sizes());
  check_same_device(weight, "weight", scores, "scores");
  TORCH_CHECK_VALUE(scores.device().is_cpu(), "scores must be a CPU tensor here, got ", scores.device());
  const int64_t n_keep = n_keep_for(density, scores.numel());
  check_hint(hint);
  const auto out_dtype = dtype.value_or(weight.scalar_type());
  auto w = weight.contiguous();
  auto s = scores.contiguous();
  auto out = pooled_empty(weight.sizes(), weight.options().dtype(out_dtype));
  std::optional<at::Tensor> t;
  bool searched = false;      // the fused pass searched the narrow window (and t was not in it)
  bool signs_packed = false;  // ... and packed the sign bytes
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "maskprune_threshold_and_mask_scores", [&] {
    using score_t = scalar_t;
    const auto h = usable_hint<score_t>(hint, abs_scores);
    if (!h || s.numel() <= kSmallSelect) return;  // no window to search: threshold, then the mask pass
    searched = true;
    const score_t* sp = s.data_ptr<score_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "maskprune_threshold_and_mask_w", [&] {
      using weight_t = scalar_t;
      const weight_t* wp = w.data_ptr<weight_t>();
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "maskprune_threshold_and_mask_out", [&] {
        scalar_t* op = out.data_ptr<scalar_t>();
        uint8_t* fused = fused_signs<score_t, weight_t, scalar_t> && is_aligned(op, 16) ? signs : nullptr;
        const int64_t n = s.numel();
        bool ran = false;
        const auto found =
            abs_scores
                ? threshold_and_mask_near<score_t, weight_t, scalar_t, true>(wp, sp, op, n, n_keep, *h, fused, ran)
                : threshold_and_mask_near<score_t, weight_t, scalar_t, false>(wp, sp, op, n, n_keep, *h, fused, ran);
        if (found) t = at::scalar_tensor(*found, at::TensorOptions().dtype(s.scalar_type()));
        signs_packed = ran && fused != nullptr;
      });
    });
  });
  if (signs != nullptr && !signs_packed) pack_signs(s, signs);
  if (t) return {*t, out};
  auto separately = [&](int first_window) -> std::tuple<at::Tensor, at::Tensor> {
    auto threshold = threshold_of({s}, density, abs_scores, hint, first_window);
    mask_into(w, s, threshold, abs_scores, out);
    return {threshold, out};
  };
  if (!searched) return separately(0);
  RECORD_FUNCTION("maskprune::threshold_and_mask.window_missed", std::vector<c10::IValue>());  // seen by tests
  return separately(1);  // the narrow window is searched already
}

std::tuple<at::Tensor, at::Tensor> threshold_and_mask_cpu(const at::Tensor& weight, const at::Tensor& scores,
                                                          double density, bool abs_scores,
                                                          const std::optional<at::Tensor>& hint,
                                                          std::optional<at::ScalarType> dtype) {
  return threshold_and_mask_into(weight, scores, density, abs_scores, hint, dtype, nullptr);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> threshold_and_mask_signs_cpu(const at::Tensor& weight,
                                                                            const at::Tensor& scores, double density,
                                                                            bool abs_scores,
                                                                            const std::optional<at::Tensor>& hint,
                                                                            std::optional<at::ScalarType> dtype) {
  auto signs = pooled_empty({(scores.numel() + 3) / 4}, scores.options().dtype(at::kByte));
  auto [t, out] = threshold_and_mask_into(weight, scores, density, abs_scores, hint, dtype, signs.data_ptr<uint8_t>());
  return {t, out, signs};
}

// dS into `out` (scores' dtype, contiguous); `out` may alias grad_weight when their dtypes match.
void score_grad_into(const at::Tensor& g, const at::Tensor& w, const at::Tensor& s, at::Tensor& out,
                     bool abs_scores) {
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "maskprune_score_grad", [&] {
    using score_t = scalar_t;
    const score_t* sp = s.data_ptr<score_t>();
    score_t* op = out.data_ptr<score_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "maskprune_score_grad_w", [&] {
      using weight_t = scalar_t;
      const weight_t* wp = w.data_ptr<weight_t>();
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "maskprune_score_grad_g", [&] {
        const scalar_t* gp = g.data_ptr<scalar_t>();
        at::parallel_for(0, s.numel(), kGrain, [&](int64_t begin, int64_t end) {
          if (abs_scores) score_grad_loop<score_t, weight_t, scalar_t, true>(gp, wp, sp, op, begin, end);
          else score_grad_loop<score_t, weight_t, scalar_t, false>(gp, wp, sp, op, begin, end);
        });
      });
    });
  });
}

at::Tensor score_grad_cpu(const at::Tensor& grad_weight, const at::Tensor& weight, const at::Tensor& scores,
                          bool abs_scores) {
  check_score_grad_args(grad_weight, weight, scores);
  auto s = scores.contiguous();
  auto out = at::empty_like(s);
  score_grad_into(grad_weight.contiguous(), weight.contiguous(), s, out, abs_scores);
  return out;
}

// In-place variant for a freshly computed weight gradient: saves one weight-sized buffer per step.
void score_grad_inplace_cpu(at::Tensor& grad_weight, const at::Tensor& weight, const at::Tensor& scores,
                            bool abs_scores) {
  check_score_grad_inplace_args(grad_weight, weight, scores);
  score_grad_into(grad_weight, weight.contiguous(), scores.contiguous(), grad_weight, abs_scores);
}

// One slice of score_grad_signs_, begin a multiple of 4: sign * (w * g) as score_grad_loop computes it.
template <typename weight_t>
void score_grad_from_signs_loop(float* g, const weight_t* w, const uint8_t* signs, int64_t begin, int64_t end) {
#if defined(MASKPRUNE_SSE2_MASK_PASS)
  if constexpr (std::is_same_v<weight_t, float>) {
    sse::score_grad_from_signs_range(g, w, signs, begin, end);
    return;
  }
#endif
  for (int64_t i = begin; i < end; ++i) g[i] = sign_of(signs, i) * (static_cast<float>(w[i]) * g[i]);
}

// dS = sign(S) * W * grad_weight over grad_weight, sign(S) read from the sign bytes threshold_and_mask_signs
// packed in the forward: the pass reads 1/16 of the scores' bytes instead of the scores.
void score_grad_from_signs_inplace_cpu(at::Tensor& grad_weight, const at::Tensor& weight, const at::Tensor& signs) {
  check_float(grad_weight, "grad_weight");
  check_float(weight, "weight");
  TORCH_CHECK_TYPE(grad_weight.scalar_type() == at::kFloat, "grad_weight must be float32 (the scores' dtype), got ",
                   grad_weight.scalar_type());
  TORCH_CHECK_VALUE(grad_weight.is_contiguous(), "grad_weight must be contiguous to take dS in place");
  TORCH_CHECK_VALUE(weight.sizes() == grad_weight.sizes(), "weight must have grad_weight's shape ",
                    grad_weight.sizes(), ", got ", weight.sizes());
  TORCH_CHECK_TYPE(signs.scalar_type() == at::kByte, "signs must be uint8 (packed sign bytes), got ",
                   signs.scalar_type());
  const int64_t n = grad_weight.numel();
  TORCH_CHECK_VALUE(signs.dim() == 1 && signs.numel() == (n + 3) / 4 && signs.is_contiguous(),
                    "signs must be a contiguous 1-d tensor of (numel + 3) / 4 = ", (n + 3) / 4, " bytes, got shape ",
                    signs.sizes());
  check_same_device(grad_weight, "grad_weight", weight, "weight");
  check_same_device(grad_weight, "grad_weight", signs, "signs");
  TORCH_CHECK_VALUE(grad_weight.device().is_cpu(), "grad_weight must be a CPU tensor here, got ",
                    grad_weight.device());
  const auto w = weight.contiguous();
  float* gp = grad_weight.data_ptr<float>();
  const uint8_t* sp = signs.data_ptr<uint8_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "maskprune_score_grad_signs", [&] {
    const scalar_t* wp = w.data_ptr<scalar_t>();
    at::parallel_for(0, (n + 3) / 4, kGrain / 4, [&](int64_t q0, int64_t q1) {
      score_grad_from_signs_loop(gp, wp, sp, 4 * q0, std::min(n, 4 * q1));
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(maskprune, CPU, m) {
  m.impl("threshold", &threshold_cpu);
  m.impl("global_threshold", &global_threshold_cpu);
  m.impl("apply_mask", &apply_mask_cpu);
  m.impl("threshold_and_mask", &threshold_and_mask_cpu);
  m.impl("threshold_and_mask_signs", &threshold_and_mask_signs_cpu);
  m.impl("score_grad_signs_", &score_grad_from_signs_inplace_cpu);
  m.impl("score_grad", &score_grad_cpu);
  m.impl("score_grad_", &score_grad_inplace_cpu);
}

}  // namespace maskprune
