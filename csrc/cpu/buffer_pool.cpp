// The CPU buffer cache of buffer_pool.h.
#include "buffer_pool.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/impl/alloc_cpu.h>
#include <pthread.h>

#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

namespace maskprune {
namespace {

size_t capacity_from_env() {
  const char* value = std::getenv("MASKPRUNE_CPU_CACHE_MB");
  if (value == nullptr || *value == '\0') return size_t{256} << 20;
  char* end = nullptr;
  errno = 0;
  const long long mb = std::strtoll(value, &end, 10);
  TORCH_CHECK_VALUE(end != value && *end == '\0' && errno == 0 && mb >= 0 &&
                        static_cast<unsigned long long>(mb) <= (SIZE_MAX >> 20),
                    "MASKPRUNE_CPU_CACHE_MB must be a whole number of megabytes >= 0, got '", value, "'");
  return static_cast<size_t>(mb) << 20;
}

// A caching allocator. Its DataPtrs are simple (context == data, as c10's CPU allocator makes them), so
// the tensors support everything others do (copy-on-write clones included); the sizes of live buffers
// that may be cached are kept in a map for the deleter (a buffer it does not find is freed).
class BufferPool final : public c10::Allocator {
 public:
  BufferPool() : capacity_(capacity_from_env()) {}

  // fork() handlers: a fork while another thread holds the lock would leave the child's copy locked for ever.
  void lock_for_fork() { mutex_.lock(); }
  void unlock_after_fork() { mutex_.unlock(); }

  c10::DataPtr allocate(size_t bytes) override {
    const bool poolable = bytes >= kPooledMinBytes;
    void* data = poolable ? take(bytes) : nullptr;
    if (data == nullptr) data = c10::alloc_cpu(bytes);
    if (poolable && data != nullptr) {
      try {
        std::lock_guard<std::mutex> lock(mutex_);
        live_.emplace(data, bytes);
      } catch (...) {
        c10::free_cpu(data);
        throw;
      }
    }
    return {data, data, &BufferPool::release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &BufferPool::release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  size_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return cached_bytes_;
  }

  void release_all() {
    std::vector<std::pair<void*, size_t>> blocks;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks.swap(cached_);
      cached_bytes_ = 0;
    }
    for (const auto& block : blocks) c10::free_cpu(block.first);
  }

 private:
  // The deleter: never throws (it runs in destructors); a buffer it cannot keep is freed.
  static void release(void* data) noexcept;

  // A cached buffer of exactly `bytes`, the most recently freed first (its pages are the likeliest in cache).
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = cached_.rbegin(); it != cached_.rend(); ++it) {
      if (it->second == bytes) {
        void* data = it->first;
        cached_bytes_ -= bytes;
        cached_.erase(std::next(it).base());
        return data;
      }
    }
    return nullptr;
  }

  // Forgets a live buffer and caches it when it is large and fits under the cap, evicting the oldest
  // cached buffers to make room; returns what to free now (possibly `data` itself).
  std::vector<void*> retire(void* data) {
    std::vector<void*> to_free;
    to_free.reserve(4);
    std::lock_guard<std::mutex> lock(mutex_);
    const auto live = live_.find(data);
    const size_t bytes = live == live_.end() ? 0 : live->second;
    if (live != live_.end()) live_.erase(live);
    if (bytes < kPooledMinBytes || bytes > capacity_) {
      to_free.push_back(data);
      return to_free;
    }
    size_t evict = 0;
    while (cached_bytes_ + bytes > capacity_) {
      to_free.push_back(cached_[evict].first);
      cached_bytes_ -= cached_[evict].second;
      ++evict;
    }
    cached_.erase(cached_.begin(), cached_.begin() + evict);
    cached_.emplace_back(data, bytes);
    cached_bytes_ += bytes;
    return to_free;
  }

  const size_t capacity_;
  std::mutex mutex_;
  std::unordered_map<void*, size_t> live_;        // buffers handed out, with their sizes
  std::vector<std::pair<void*, size_t>> cached_;  // freed buffers kept for reuse, oldest first
  size_t cached_bytes_ = 0;
};

// The one pool, made on first use (thread-safe; a constructor that throws, for a bad MASKPRUNE_CPU_CACHE_MB,
// runs again at the next call) and never destroyed: tensors freed during interpreter shutdown still call
// release().
BufferPool& pool() {
  static BufferPool* const instance = [] {
    auto* made = new BufferPool();
    pthread_atfork([] { pool().lock_for_fork(); }, [] { pool().unlock_after_fork(); },
                   [] { pool().unlock_after_fork(); });
    return made;
  }();
  return *instance;
}

void BufferPool::release(void* data) noexcept {
  if (data == nullptr) return;
  std::vector<void*> to_free;
  try {
    to_free = pool().retire(data);
  } catch (...) {
    to_free = {data};  // out of memory for the bookkeeping: free the buffer instead of keeping it
  }
  for (void* p : to_free) c10::free_cpu(p);
}

}  // namespace

c10::Allocator* buffer_pool() { return &pool(); }

size_t buffer_pool_cached_bytes() { return pool().cached_bytes(); }

void buffer_pool_release() { pool().release_all(); }

at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  TORCH_CHECK(options.device().is_cpu() && !options.pinned_memory(),
              "pooled_empty makes unpinned CPU tensors, got device ", options.device());
  return at::detail::empty_generic(sizes, buffer_pool(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), std::nullopt);
}

}  // namespace maskprune
