// CUDA launchers of the persistent recurrent kernels (persistent.cu): one launch runs many steps
// of one layer direction's recurrence, its CTAs all co-resident (a cooperative launch) and each
// holding its part of W_hh in shared memory. The step loops are persistent_steps.h's, the plan
// persistent_plan.h's. Framework-free: the torch glue (backend.cpp) includes this from host C++.
//
// Instantiated in persistent.cu for Cell in {LstmCell, GruCell, RnnCell} and S in {float,
// __half, __nv_bfloat16}. Each launcher enqueues on `stream` (no synchronisation, no allocation:
// capturable in a CUDA graph) and returns the launch's status; `barrier` is one 8-byte word of
// device memory for the counter barrier (grid_sync false), which the launcher zeroes first.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include "persistent_steps.h"

namespace fused_rnn {
namespace persistent {

template <class Cell, typename S>
cudaError_t launch_forward(const ForwardArgs<S>& args, bool grid_sync, unsigned long long* barrier,
                           cudaStream_t stream);

template <class Cell, typename S>
cudaError_t launch_backward(const BackwardArgs<S>& args, bool grid_sync, unsigned long long* barrier,
                            cudaStream_t stream);

// How many CTAs of the forward (backward) kernel with `smem_bytes` of dynamic shared memory one
// multiprocessor of the current device holds at once.
template <class Cell, typename S>
cudaError_t blocks_per_multiprocessor(bool backward, bool grid_sync, int64_t smem_bytes, int* blocks);

}  // namespace persistent
}  // namespace fused_rnn
