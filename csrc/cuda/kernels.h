// CUDA launchers for the per-step pointwise pass of each cell (the gate math is cells.h's).
// Framework-free: the torch glue (backend.cpp) includes this header from host C++.
//
// Instantiated in kernels.cu for Cell in {LstmCell, GruCell, RnnCell} and
// S in {float, double, __half, __nv_bfloat16}. Half-precision storage computes in float.
// Each launcher enqueues one kernel on `stream` (no synchronisation, no allocation, so it
// can be captured in a CUDA graph) and returns the launch status from cudaGetLastError.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "../cells.h"

namespace fused_rnn {

// Runs Cell::forward on every row b < batch and hidden column j < step.hidden.
template <class Cell, typename S>
cudaError_t launch_forward_step(const StepForward<S>& step, int64_t batch, cudaStream_t stream);

// Runs Cell::backward on every row b < batch and hidden column j < step.hidden.
template <class Cell, typename S>
cudaError_t launch_backward_step(const StepBackward<S>& step, int64_t batch, cudaStream_t stream);

}  // namespace fused_rnn
