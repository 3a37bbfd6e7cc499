// A cache of the large CPU buffers the mask passes write every training step (W ⊙ M).
// Straight from malloc, each step's W ⊙ M memory goes back to the OS when the step frees it (glibc trims
// its heap) and comes back through page faults in the next step: 1,000-5,000 faults per bench_cpu step.
// The cache keeps freed buffers for reuse by the next buffer of the same size, as PyTorch's CUDA caching
// allocator does on the GPU.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/Allocator.h>

#include <cstddef>

namespace maskprune {

// Buffers of at least this many bytes go through the cache; smaller ones straight to c10's CPU allocator.
constexpr size_t kPooledMinBytes = size_t{1} << 20;

// The caching allocator: a freed buffer is kept (newest first, reused by a request of exactly its size;
// the oldest are evicted to make room) within MASKPRUNE_CPU_CACHE_MB megabytes (read on first use; default
// 256; 0 turns it off). Throws ValueError for a bad MASKPRUNE_CPU_CACHE_MB.
c10::Allocator* buffer_pool();

// Bytes the cache holds now (freed buffers waiting for reuse).
size_t buffer_pool_cached_bytes();

// Frees every cached buffer.
void buffer_pool_release();

// at::empty for CPU tensors, through the cache.
at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace maskprune
