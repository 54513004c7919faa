// Scratch buffers of the CPU backend, kept per thread from one call to the next. A fresh
// buffer of a few megabytes costs a page fault per 4 KiB page on every call (glibc gives large
// freed blocks back to the system), several microseconds each on a VM: for small layers, more
// than the arithmetic. Buffers above kMaxKeptBytes are allocated per call instead.
#pragma once

#include <ATen/ATen.h>

#include <array>

#include "../layer.h"

namespace fused_rnn {

inline at::Tensor cpu_scratch(Scratch slot, at::IntArrayRef sizes, const at::TensorOptions& options) {
  constexpr int64_t kMaxKeptBytes = int64_t(32) << 20;
  thread_local std::array<at::Tensor, static_cast<size_t>(Scratch::kCount)> kept;  // bytes
  const int64_t numel = c10::multiply_integers(sizes), item = options.dtype().itemsize();
  const int64_t bytes = numel * item;
  if (bytes > kMaxKeptBytes) return at::empty(sizes, options);
  at::Tensor& buffer = kept[static_cast<size_t>(slot)];
  if (!buffer.defined() || buffer.numel() < bytes) {
    buffer = at::Tensor();  // free the old one first
    buffer = at::empty({bytes}, options.dtype(at::kByte));
  }
  // A view of the kept bytes as the requested type and shape (it keeps them alive).
  return buffer.narrow(0, 0, bytes).view(options.dtype().toScalarType()).view(sizes);
}

}  // namespace fused_rnn
