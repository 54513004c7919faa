// Memory of the CPU backend that is kept from one call to the next. A fresh buffer of a few
// megabytes costs a page fault per 4 KiB page on every call (glibc gives large freed blocks back
// to the system), several microseconds each on a VM: for small layers, more than the arithmetic.
//  - cpu_scratch: buffers used only while an op runs, one per role and thread.
//  - cpu_empty: the large tensors an op returns (outputs, the reserve, input gradients), taken
//    from a cache of blocks freed by earlier such tensors, up to a total size (env var
//    FUSED_RNN_CPU_CACHE_MB, default 256).
// fused_rnn.empty_cache() releases the cache and the calling thread's scratch buffers.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/CPUAllocator.h>

#include <array>
#include <cstdlib>
#include <mutex>
#include <pthread.h>
#include <sys/mman.h>
#include <vector>

#include "../layer.h"

namespace fused_rnn {

inline std::array<at::Tensor, static_cast<size_t>(Scratch::kCount)>& kept_scratch() {
  thread_local std::array<at::Tensor, static_cast<size_t>(Scratch::kCount)> kept;  // bytes
  return kept;
}

// An uninitialised byte tensor. From 8 MiB (where rounding up to whole huge pages adds at most a
// quarter) its memory is aligned to 2 MiB and the kernel asked to back it with huge pages: where
// transparent huge pages are on "madvise", the default of many distributions, it would otherwise
// get 4 KiB pages. A panel-laid-out weight that every step reads from end to end then takes a TLB
// miss per 2 MiB instead of per 4 KiB, and a fresh one a page fault per 2 MiB as it is laid out
// (AVX2 VM, LSTM I=16 H=2048 inference, 20 steps over 64 MiB of W_hh: B=1 75 -> 44 ms, B=16
// 139 -> 105 ms).
inline at::Tensor scratch_bytes(int64_t bytes) {
  constexpr size_t kHugePageBytes = size_t(2) << 20;
  if (static_cast<size_t>(bytes) < 4 * kHugePageBytes) return at::empty({bytes}, at::TensorOptions().dtype(at::kByte));
  void* data = nullptr;
  const size_t size = (static_cast<size_t>(bytes) + kHugePageBytes - 1) / kHugePageBytes * kHugePageBytes;
  if (posix_memalign(&data, kHugePageBytes, size) != 0)
    TORCH_CHECK_WITH(OutOfMemoryError, false, "fused_rnn: failed to allocate ", bytes, " bytes");
#if defined(MADV_HUGEPAGE)
  madvise(data, size, MADV_HUGEPAGE);  // advice: where it fails, the pages are 4 KiB ones
#endif
  c10::DataPtr memory(data, data, &std::free, c10::Device(c10::kCPU));
  c10::Storage storage(c10::Storage::use_byte_size_t(), bytes, std::move(memory), nullptr, false);
  return at::empty({0}, at::TensorOptions().dtype(at::kByte)).set_(std::move(storage), 0, {bytes}, {1});
}

inline at::Tensor cpu_scratch(Scratch slot, at::IntArrayRef sizes, const at::TensorOptions& options) {
  constexpr int64_t kMaxKeptBytes = int64_t(32) << 20;
  const int64_t numel = c10::multiply_integers(sizes), item = options.dtype().itemsize();
  const int64_t bytes = numel * item;
  at::Tensor fresh;  // a buffer too large to keep: this call's alone
  if (bytes > kMaxKeptBytes) fresh = scratch_bytes(bytes);
  at::Tensor& buffer = fresh.defined() ? fresh : kept_scratch()[static_cast<size_t>(slot)];
  if (!buffer.defined() || buffer.numel() < bytes) {
    buffer = at::Tensor();  // free the old one first
    buffer = scratch_bytes(bytes);
  }
  // The bytes as the requested type and shape, sharing (and keeping alive) their storage: built
  // directly rather than by view ops, each a dispatcher round trip, as small calls make several
  // of these.
  at::Tensor view = at::detail::make_tensor<c10::TensorImpl>(c10::Storage(buffer.storage()), buffer.key_set(),
                                                             options.dtype());
  view.unsafeGetTensorImpl()->set_sizes_contiguous(sizes);
  return view;
}

// Freed blocks kept for reuse; shared by all threads (a tensor may be freed on any thread).
class BlockCache {
 public:
  static constexpr size_t kAlignment = 64;  // as c10's CPU allocator

  // Never destroyed: tensors may still be freed into it while the process exits.
  static BlockCache& instance() {
    static BlockCache* cache = new BlockCache();
    return *cache;
  }

  // A block of at least `bytes`: a cached one of at most twice that size, else a new one.
  std::pair<void*, size_t> take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto best = blocks_.end();
      for (auto it = blocks_.begin(); it != blocks_.end(); ++it)
        if (it->second >= bytes && it->second <= 2 * bytes && (best == blocks_.end() || it->second < best->second))
          best = it;
      if (best != blocks_.end()) {
        const auto block = *best;
        blocks_.erase(best);
        cached_bytes_ -= block.second;
        return block;
      }
    }
    void* data = nullptr;
    if (posix_memalign(&data, kAlignment, bytes) != 0) TORCH_CHECK_WITH(OutOfMemoryError, false, "fused_rnn: failed to allocate ", bytes, " bytes");
    return {data, bytes};
  }

  void give_back(void* data, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (cached_bytes_ + bytes <= limit_) {
        blocks_.emplace_back(data, bytes);
        cached_bytes_ += bytes;
        return;
      }
    }
    std::free(data);
  }

  void release() {
    std::vector<std::pair<void*, size_t>> blocks;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks.swap(blocks_);
      cached_bytes_ = 0;
    }
    for (const auto& block : blocks) std::free(block.first);
  }

 private:
  BlockCache() {
    const char* env = std::getenv("FUSED_RNN_CPU_CACHE_MB");
    limit_ = static_cast<size_t>(env ? std::max(0LL, std::atoll(env)) : 256) << 20;
    // fork() copies the mutex as it is: locked, if another thread was freeing a tensor just then,
    // and no thread in the child would ever unlock it. The forking thread takes it first and both
    // processes release it after, so the child starts with a free lock and a consistent list.
    pthread_atfork([] { instance().mutex_.lock(); }, [] { instance().mutex_.unlock(); },
                   [] { instance().mutex_.unlock(); });
  }

  std::mutex mutex_;
  std::vector<std::pair<void*, size_t>> blocks_;
  size_t cached_bytes_ = 0, limit_ = 0;
};

struct CachedBlock {
  void* data;
  size_t bytes;
  static void give_back(void* block) {
    const CachedBlock* b = static_cast<CachedBlock*>(block);
    BlockCache::instance().give_back(b->data, b->bytes);
    delete b;
  }
};

// An uninitialised contiguous tensor; from 1 MiB (glibc keeps smaller blocks in its heap) its
// memory comes from the block cache and goes back to it when the tensor is freed. The storage
// resizes like any other (through the CPU allocator).
inline at::Tensor cpu_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  constexpr size_t kMinCachedBytes = size_t(1) << 20;
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (bytes < kMinCachedBytes) return at::empty(sizes, options);
  const auto [data, size] = BlockCache::instance().take(bytes);
  c10::DataPtr memory(data, new CachedBlock{data, size}, &CachedBlock::give_back, c10::Device(c10::kCPU));
  c10::Storage storage(c10::Storage::use_byte_size_t(), bytes, std::move(memory), c10::GetCPUAllocator(), true);
  return at::empty({0}, options).set_(std::move(storage), 0, sizes, c10::contiguous_strides(sizes));
}

inline void release_cpu_memory() {
  BlockCache::instance().release();
  for (at::Tensor& buffer : kept_scratch()) buffer = at::Tensor();
}

}  // namespace fused_rnn
