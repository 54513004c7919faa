// CUDA kernels for the per-step pointwise pass: one thread per (row, hidden column), each
// running the cell's shared gate math from cells.h on a single element.
#include "kernels.h"

#include "element_io.h"

namespace fused_rnn {
namespace {

constexpr int kThreads = 256;
// Enough blocks to fill any current GPU several times over; larger steps grid-stride.
constexpr int64_t kMaxBlocks = 1 << 16;

template <class Cell, typename V, typename IO, typename S>
FR_HD void run_cell(const StepForward<S>& step, int64_t b, int64_t j) {
  Cell::template forward<V, IO>(step, b, j);
}

template <class Cell, typename V, typename IO, typename S>
FR_HD void run_cell(const StepBackward<S>& step, int64_t b, int64_t j) {
  Cell::template backward<V, IO>(step, b, j);
}

// Index is uint32_t when batch * hidden fits (cheaper division), else uint64_t.
template <class Cell, template <typename> class Step, typename S, typename Index>
__global__ void __launch_bounds__(kThreads) step_kernel(const Step<S> step, Index count) {
  using V = typename MathType<S>::type;
  const Index hidden = static_cast<Index>(step.hidden);
  const Index stride = static_cast<Index>(gridDim.x) * blockDim.x;
  for (Index idx = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; idx < count; idx += stride) {
    run_cell<Cell, V, ElementIO<S, V>>(step, static_cast<int64_t>(idx / hidden), static_cast<int64_t>(idx % hidden));
  }
}

template <class Cell, template <typename> class Step, typename S>
cudaError_t launch_step(const Step<S>& step, int64_t batch, cudaStream_t stream) {
  const int64_t count = batch * step.hidden;
  if (count <= 0) return cudaSuccess;
  const int64_t needed = (count + kThreads - 1) / kThreads;
  const unsigned blocks = static_cast<unsigned>(needed < kMaxBlocks ? needed : kMaxBlocks);
  // With count < 2^31 the 32-bit index cannot wrap: idx + stride < 2^31 + 2^24.
  if (count <= INT32_MAX) {
    step_kernel<Cell, Step, S, uint32_t><<<blocks, kThreads, 0, stream>>>(step, static_cast<uint32_t>(count));
  } else {
    step_kernel<Cell, Step, S, uint64_t><<<blocks, kThreads, 0, stream>>>(step, static_cast<uint64_t>(count));
  }
  return cudaGetLastError();
}

}  // namespace

template <class Cell, typename S>
cudaError_t launch_forward_step(const StepForward<S>& step, int64_t batch, cudaStream_t stream) {
  return launch_step<Cell>(step, batch, stream);
}

template <class Cell, typename S>
cudaError_t launch_backward_step(const StepBackward<S>& step, int64_t batch, cudaStream_t stream) {
  return launch_step<Cell>(step, batch, stream);
}

#define FUSED_RNN_INSTANTIATE(Cell, S)                                                               \
  template cudaError_t launch_forward_step<Cell, S>(const StepForward<S>&, int64_t, cudaStream_t); \
  template cudaError_t launch_backward_step<Cell, S>(const StepBackward<S>&, int64_t, cudaStream_t);

#define FUSED_RNN_INSTANTIATE_CELL(Cell) \
  FUSED_RNN_INSTANTIATE(Cell, float)     \
  FUSED_RNN_INSTANTIATE(Cell, double)    \
  FUSED_RNN_INSTANTIATE(Cell, __half)    \
  FUSED_RNN_INSTANTIATE(Cell, __nv_bfloat16)

FUSED_RNN_INSTANTIATE_CELL(LstmCell)
FUSED_RNN_INSTANTIATE_CELL(GruCell)
FUSED_RNN_INSTANTIATE_CELL(RnnCell)

}  // namespace fused_rnn
