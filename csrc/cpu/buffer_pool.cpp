// The CPU buffer cache of buffer_pool.h.
#include "buffer_pool.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/impl/alloc_cpu.h>

#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

namespace maskprune {
namespace {

struct Block {
  void* data;
  size_t bytes;
};

size_t capacity_from_env() {
  const char* value = std::getenv("MASKPRUNE_CPU_CACHE_MB");
  if (value == nullptr || *value == '\0') return size_t{256} << 20;
  char* end = nullptr;
  const long long mb = std::strtoll(value, &end, 10);
  TORCH_CHECK_VALUE(end != nullptr && *end == '\0' && mb >= 0,
                    "MASKPRUNE_CPU_CACHE_MB must be a whole number of megabytes >= 0, got '", value, "'");
  return static_cast<size_t>(mb) << 20;
}

class BufferPool final : public c10::Allocator {
 public:
  BufferPool() : capacity_(capacity_from_env()) {}

  c10::DataPtr allocate(size_t bytes) override {
    void* data = bytes >= kPooledMinBytes ? take(bytes) : nullptr;
    if (data == nullptr) data = c10::alloc_cpu(bytes);
    return {data, new Block{data, bytes}, &BufferPool::release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  size_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return cached_bytes_;
  }

  void release_all() {
    std::vector<Block> blocks;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks.swap(cached_);
      cached_bytes_ = 0;
    }
    for (const auto& b : blocks) c10::free_cpu(b.data);
  }

 private:
  static void release(void* context);

  // A cached buffer of exactly `bytes`, the most recently freed first (its pages are the likeliest in cache).
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = cached_.rbegin(); it != cached_.rend(); ++it) {
      if (it->bytes == bytes) {
        void* data = it->data;
        cached_bytes_ -= bytes;
        cached_.erase(std::next(it).base());
        return data;
      }
    }
    return nullptr;
  }

  // Keeps a freed buffer if it is large and fits under the cap.
  bool keep(const Block& block) {
    if (block.bytes < kPooledMinBytes) return false;
    std::lock_guard<std::mutex> lock(mutex_);
    if (cached_bytes_ + block.bytes > capacity_) return false;
    cached_.push_back(block);
    cached_bytes_ += block.bytes;
    return true;
  }

  const size_t capacity_;
  std::mutex mutex_;
  std::vector<Block> cached_;
  size_t cached_bytes_ = 0;
};

// Never destroyed: tensors freed during interpreter shutdown still call release().
BufferPool& pool() {
  static auto* instance = new BufferPool();
  return *instance;
}

void BufferPool::release(void* context) {
  auto* block = static_cast<Block*>(context);
  if (!pool().keep(*block)) c10::free_cpu(block->data);
  delete block;
}

}  // namespace

c10::Allocator* buffer_pool() { return &pool(); }

size_t buffer_pool_cached_bytes() { return pool().cached_bytes(); }

void buffer_pool_release() { pool().release_all(); }

at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  TORCH_CHECK(options.device().is_cpu(), "pooled_empty makes CPU tensors, got ", options.device());
  return at::detail::empty_generic(sizes, buffer_pool(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), std::nullopt);
}

}  // namespace maskprune
