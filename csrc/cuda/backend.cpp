// CUDA backend: the per-step GEMMs go to cuBLAS through ATen's handle for the current stream
// (so TF32 and the workspace follow torch's settings) and the per-step pointwise pass is one
// kernel launch (kernels.cu) on the same stream. Nothing here synchronises with the host or
// allocates outside torch's caching allocator, so a forward or backward can be captured in a
// CUDA graph.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "../ops.h"
#include "kernels.h"
#include "persistent.h"

namespace fused_rnn {
namespace {

// The CUDA type with the same bits as each ATen scalar type.
template <typename S>
struct CudaScalar {
  using type = S;
};
template <>
struct CudaScalar<c10::Half> {
  using type = __half;
};
template <>
struct CudaScalar<c10::BFloat16> {
  using type = __nv_bfloat16;
};

static_assert(sizeof(c10::Half) == sizeof(__half) && alignof(c10::Half) == alignof(__half));
static_assert(sizeof(c10::BFloat16) == sizeof(__nv_bfloat16) && alignof(c10::BFloat16) == alignof(__nv_bfloat16));

// Step<S> as Step<CUDA type>: only the pointee types of its pointers change, so both structs
// have the same layout and the bits carry over.
template <template <typename> class Step, typename S>
Step<typename CudaScalar<S>::type> as_cuda(const Step<S>& step) {
  using Target = Step<typename CudaScalar<S>::type>;
  static_assert(sizeof(Target) == sizeof(Step<S>) && alignof(Target) == alignof(Step<S>));
  static_assert(std::is_trivially_copyable_v<Target> && std::is_trivially_copyable_v<Step<S>>);
  Target target;
  std::memcpy(&target, &step, sizeof(Target));
  return target;
}

// Which path runs the recurrence, from FUSED_RNN_CUDA_KERNEL (read at every call, so that a
// process can compare both): "persistent" where the persistent kernels can (else per step),
// "stepwise" always per step, "auto" (the default) the planner's choice.
enum class KernelChoice { kAuto, kPersistent, kStepwise };

KernelChoice kernel_choice() {
  const char* value = std::getenv("FUSED_RNN_CUDA_KERNEL");
  if (value == nullptr || *value == '\0' || std::strcmp(value, "auto") == 0) return KernelChoice::kAuto;
  if (std::strcmp(value, "persistent") == 0) return KernelChoice::kPersistent;
  if (std::strcmp(value, "stepwise") == 0) return KernelChoice::kStepwise;
  TORCH_CHECK_VALUE(false, "FUSED_RNN_CUDA_KERNEL must be auto, persistent or stepwise, got '", value, "'");
}

// What "auto" runs: the per-step path until the persistent kernels have passed .ci/gpu on a GPU
// (tests, compute-sanitizer, benchmarks) with FUSED_RNN_CUDA_KERNEL=persistent.
constexpr bool kAutoPersistent = false;

// The persistent kernels' grid barrier, from FUSED_RNN_CUDA_BARRIER: "grid" (the default,
// cooperative groups' grid.sync()) or "counter" (an arrival counter), for measuring both.
bool grid_sync_barrier() {
  const char* value = std::getenv("FUSED_RNN_CUDA_BARRIER");
  if (value == nullptr || *value == '\0' || std::strcmp(value, "grid") == 0) return true;
  TORCH_CHECK_VALUE(std::strcmp(value, "counter") == 0, "FUSED_RNN_CUDA_BARRIER must be grid or counter, got '",
                    value, "'");
  return false;
}

// Which path ran (fused_rnn.cuda_recurrence_counts()): persistent launches, and steps run by a
// GEMM and a pointwise kernel each.
std::atomic<int64_t> persistent_launches{0};
std::atomic<int64_t> stepwise_steps{0};

}  // namespace

std::vector<int64_t> cuda_recurrence_counts() { return {persistent_launches.load(), stepwise_steps.load()}; }

// A layer's recurrence on the persistent kernels (persistent.h), where they run it: each chunk
// of steps in one launch (or a few, for packed sequences of many lengths) instead of a GEMM and
// a pointwise kernel per step. Off (forward/backward return false) for float64, LSTM projections,
// GPUs before compute capability 8.0, and where W_hh does not fit the GPU's shared memory.
template <class Cell, typename S>
struct CudaPersistentRecurrence {
  using T = typename CudaScalar<S>::type;

  bool on = false;
  bool grid_sync = true;
  persistent::Layout layout{};
  const S* w_hh = nullptr;
  at::Tensor h_other;  // forward: the second state buffer
  at::Tensor barrier;  // the counter barrier's word

  // The batch and row (from the chunk's first row) of each of its steps, in processing order.
  template <class Step>
  static void chunk_steps(const RecurrenceChunk<Step>& chunk, std::vector<int64_t>& batch, std::vector<int64_t>& row) {
    const Steps& s = chunk.steps;
    for (int64_t k = chunk.first; k < chunk.last; ++k) {
      const int64_t t = chunk.time_backwards ? s.count() - 1 - k : k;
      batch.push_back(s.batch[t]);
      row.push_back(s.offset[t] - chunk.row_lo);
    }
  }

  unsigned long long* barrier_word() const { return reinterpret_cast<unsigned long long*>(barrier.data_ptr()); }

  bool forward(const RecurrenceChunk<StepForward<S>>& chunk, S* hidden_gates) const {
    if (!on) return false;
    std::vector<int64_t> batch, row;
    chunk_steps(chunk, batch, row);
    persistent::ForwardArgs<T> args{};
    args.step = as_cuda(chunk.step);
    args.hidden_gates = reinterpret_cast<T*>(hidden_gates);
    args.w_hh = reinterpret_cast<const T*>(w_hh);
    args.state_rows = max_batch(chunk.steps);
    args.layout = layout;
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const size_t state_bytes = args.state_rows * chunk.step.hidden * sizeof(T);
    persistent::run_forward_chunk(
        args, batch.data(), row.data(), static_cast<int64_t>(batch.size()), chunk.time_backwards, args.step.h_state,
        reinterpret_cast<T*>(h_other.data_ptr()),
        [&](T* dst, const T* src) {
          C10_CUDA_CHECK(cudaMemcpyAsync(dst, src, state_bytes, cudaMemcpyDeviceToDevice, stream));
        },
        [&](const persistent::ForwardArgs<T>& launch) {
          const cudaError_t launched = persistent::launch_forward<Cell, T>(launch, grid_sync, barrier_word(), stream);
          C10_CUDA_CHECK(launched);
          persistent_launches.fetch_add(1, std::memory_order_relaxed);
        });
    return true;
  }

  bool backward(const RecurrenceChunk<StepBackward<S>>& chunk) const {
    if (!on) return false;
    std::vector<int64_t> batch, row;
    chunk_steps(chunk, batch, row);
    persistent::BackwardArgs<T> args{};
    args.step = as_cuda(chunk.step);
    args.w_hh = reinterpret_cast<const T*>(w_hh);
    args.grad_h_prev_beta = grad_h_prev_beta<Cell, float>();
    args.last_product = chunk.last_product;
    args.layout = layout;
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    persistent::run_backward_chunk<Cell>(
        args, batch.data(), row.data(), static_cast<int64_t>(batch.size()), chunk.time_backwards,
        [&](const persistent::BackwardArgs<T>& launch) {
          const cudaError_t launched = persistent::launch_backward<Cell, T>(launch, grid_sync, barrier_word(), stream);
          C10_CUDA_CHECK(launched);
          persistent_launches.fetch_add(1, std::memory_order_relaxed);
        });
    return true;
  }
};

// A weight W used as the right operand of every step's GEMM: C[m, n] = A[m, k] op(W) + beta C,
// with W row-major [n, k] when trans (op(W) = W^T), else [k, n].
template <typename S>
struct CudaStepWeight {
  const S* w;
  bool trans;
  int64_t k, n;
  // The current stream's cuBLAS handle, looked up once per op rather than at every step (the
  // lookup also re-applies the stream, workspace and math mode, which do not change within an op).
  cublasHandle_t handle;
  int64_t row_groups = 1;    // every step runs all its rows at once
  int64_t folded_input = 0;  // the input projection stays one large GEMM

  void gemm(int64_t m, const S* a, int64_t lda, S beta, S* c, int64_t ldc) const;
};

struct CudaBackend {
  // Chunks of up to 16M gate values (64 MiB in float32): most sequences are one chunk, so the
  // input projection, input gradient and weight gradients are each one GEMM over all steps
  // (cuBLAS wants large ones), and half-precision weight gradients are not summed chunk by chunk
  // in the half type.
  static constexpr int64_t kForwardChunkValues = int64_t(1) << 24;
  static constexpr int64_t kBackwardChunkValues = int64_t(1) << 24;
  template <typename S>
  static int64_t min_projection_chunk_rows(const at::Tensor&, int64_t /*rows*/) { return 1; }
  template <class W>
  static int64_t max_projection_chunk_rows(const W& /*w_hh*/) { return std::numeric_limits<int64_t>::max(); }
  // Gate rows as packed as the kernels index them.
  static int64_t gate_row_stride(int64_t width, int64_t /*element_size*/) { return width; }

  static void check_dtype(at::ScalarType t) {
    TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
                "fused_rnn on CUDA supports float32, float64, float16 and bfloat16 tensors, got ", t);
  }

  // Every type computes natively (half types with float accumulation and float pointwise math).
  static constexpr bool kHalfKernels = true;

  static constexpr bool kPersistentRecurrence = true;

  // The persistent kernels for this layer, on where FUSED_RNN_CUDA_KERNEL (see kernel_choice)
  // asks for them and the planner finds a layout for W_hh that the GPU holds with every CTA
  // co-resident.
  template <class Cell, typename S>
  static CudaPersistentRecurrence<Cell, S> persistent_recurrence(const at::Tensor& w_hh, int64_t hidden,
                                                                 int64_t h_out, int64_t max_rows, bool backward) {
    CudaPersistentRecurrence<Cell, S> p;
    if constexpr (!std::is_same_v<S, double>) {
      const KernelChoice choice = kernel_choice();
      if (choice == KernelChoice::kStepwise || (choice == KernelChoice::kAuto && !kAutoPersistent)) return p;
      const cudaDeviceProp* device = at::cuda::getCurrentDeviceProperties();
      if (h_out != hidden || max_rows <= 0 || device->major < 8) return p;
      using T = typename CudaScalar<S>::type;
      const auto math = std::is_same_v<S, float> ? persistent::Math::kFma : persistent::Math::kMma;
      const auto element_bytes = static_cast<int32_t>(sizeof(S));
      const persistent::Pass pass = backward ? persistent::backward_pass(Cell::kGates, hidden, element_bytes, math)
                                             : persistent::forward_pass(Cell::kGates, hidden, element_bytes, math);
      p.layout = persistent::plan_layout(pass, max_rows, device->multiProcessorCount,
                                         static_cast<int64_t>(device->sharedMemPerBlockOptin));
      if (p.layout.verdict != persistent::Verdict::kFits) return p;
      p.grid_sync = grid_sync_barrier();
      int blocks = 0;
      if (persistent::blocks_per_multiprocessor<Cell, T>(backward, p.grid_sync, p.layout.smem_bytes, &blocks) !=
          cudaSuccess) {
        (void)cudaGetLastError();  // cleared: this layer runs per step
        return p;
      }
      if (int64_t(blocks) * device->multiProcessorCount < p.layout.ctas) return p;
      p.w_hh = ptr<S>(w_hh);
      if (!backward) p.h_other = at::empty({max_rows, hidden}, w_hh.options());
      p.barrier = at::empty({1}, w_hh.options().dtype(at::kLong));
      p.on = true;
    }
    return p;
  }

  static c10::cuda::CUDAGuard guard(const c10::Device& device) { return c10::cuda::CUDAGuard(device); }

  // out = x op(w) (+ bias) by cuBLAS through ATen.
  struct DenseWeight {
    at::Tensor w, bias;
    bool trans;

    void apply_out(at::Tensor& out, const at::Tensor& x) const {
      const at::Tensor op_w = trans ? w.t() : w;
      if (bias.defined()) at::addmm_out(out, bias, x, op_w);
      else at::mm_out(out, x, op_w);
    }
  };

  template <typename S>
  static DenseWeight dense_weight(const at::Tensor& w, bool trans, const at::Tensor& bias, int64_t /*rows*/,
                                  int64_t /*chunk_rows*/, at::ScalarType /*operands: never set, kHalfKernels*/) {
    return {w, bias, trans};
  }

  template <typename S>
  static void weight_grad_out(at::Tensor& grad_w, const at::Tensor& g, const at::Tensor& x, bool accumulate,
                              at::ScalarType /*operands: never set, kHalfKernels*/ = at::ScalarType::Undefined) {
    if (accumulate) grad_w.addmm_(g.t(), x);
    else at::mm_out(grad_w, g.t(), x);
  }

  // Row-major C[m, n] = alpha op(A) op(B) + beta C, as the column-major product C^T = op(B)^T op(A)^T
  // on the same memory. With beta == 0, cuBLAS does not read C, which may then hold garbage.
  template <typename S>
  static void gemm(cublasHandle_t handle, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, S alpha,
                   const S* a, int64_t lda, const S* b, int64_t ldb, S beta, S* c, int64_t ldc) {
    if (m == 0 || n == 0) return;
    TORCH_CHECK(std::max({m, n, k, lda, ldb, ldc}) <= std::numeric_limits<int>::max(),
                "fused_rnn: a per-step GEMM of [", m, ", ", k, "] x [", k, ", ", n, "] exceeds cuBLAS's int sizes");
    const int mi = m, ni = n, ki = k, ld_a = lda, ld_b = ldb, ld_c = ldc;
    const cublasOperation_t op_a = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
    const cublasOperation_t op_b = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    if constexpr (std::is_same_v<S, float>) {
      TORCH_CUDABLAS_CHECK(cublasSgemm(handle, op_b, op_a, ni, mi, ki, &alpha, b, ld_b, a, ld_a, &beta, c, ld_c));
    } else if constexpr (std::is_same_v<S, double>) {
      TORCH_CUDABLAS_CHECK(cublasDgemm(handle, op_b, op_a, ni, mi, ki, &alpha, b, ld_b, a, ld_a, &beta, c, ld_c));
    } else {
      // Half-precision storage accumulates in float, as torch's own half GEMMs do.
      static_assert(std::is_same_v<S, c10::Half> || std::is_same_v<S, c10::BFloat16>);
      const cudaDataType_t type = std::is_same_v<S, c10::Half> ? CUDA_R_16F : CUDA_R_16BF;
      const float alpha_f = static_cast<float>(alpha), beta_f = static_cast<float>(beta);
      TORCH_CUDABLAS_CHECK(cublasGemmEx(handle, op_b, op_a, ni, mi, ki, &alpha_f, b, type, ld_b, a, type, ld_a,
                                        &beta_f, c, type, ld_c, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    }
  }

  // Device-to-device, on the current stream (after the GEMM that wrote src).
  template <typename S>
  static void copy(S* dst, const S* src, int64_t n) {
    C10_CUDA_CHECK(cudaMemcpyAsync(dst, src, n * sizeof(S), cudaMemcpyDeviceToDevice, at::cuda::getCurrentCUDAStream()));
  }

  // An ATen add on views of the three ranges (the current device and stream; nothing allocated).
  template <typename S>
  static void add(S* dst, const S* a, const S* b, int64_t n) {
    const auto options = at::TensorOptions()
                             .dtype(c10::CppTypeToScalarType<S>::value)
                             .device(at::kCUDA, c10::cuda::current_device());
    auto view = [&](const S* p) { return at::from_blob(const_cast<S*>(p), {n}, options); };
    at::Tensor out = view(dst);
    at::add_out(out, view(a), view(b));
  }

  // The caching allocator already reuses memory from call to call.
  static at::Tensor scratch(Scratch, at::IntArrayRef sizes, const at::TensorOptions& options) {
    return at::empty(sizes, options);
  }

  static at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    return at::empty(sizes, options);
  }

  // cuBLAS reads W in place: nothing to prepare, whatever the batch or the number of steps.
  template <typename S>
  static CudaStepWeight<S> step_weight(const at::Tensor& w, bool trans, int64_t k, int64_t n, int64_t /*max_rows*/,
                                       int64_t /*steps*/, Scratch /*slot*/,
                                       at::ScalarType /*operands: never set, kHalfKernels*/) {
    return {ptr<S>(w), trans, k, n, at::cuda::getCurrentCUDABlasHandle()};
  }

  template <class Cell, typename S>
  static CudaStepWeight<S> recurrent_weight(const at::Tensor& w_hh, int64_t h_out, int64_t hidden, int64_t max_rows,
                                            int64_t steps, const at::Tensor& /*w_ih*/, const at::Tensor& /*bias*/,
                                            at::ScalarType operands) {
    return step_weight<S>(w_hh, true, h_out, Cell::kGates * hidden, max_rows, steps, Scratch::kRecurrentWeight,
                          operands);
  }

  // A single group of all rows: each step is one GEMM and one kernel over its whole batch.
  template <typename F>
  static void for_each_row_group(const Steps& s, int64_t /*t_lo*/, int64_t /*t_hi*/, int64_t /*groups*/,
                                 const F& run) {
    run(0, max_batch(s));
  }

  // The input is never folded into the recurrent GEMM here.
  template <typename S>
  static bool reads_stored_input(const CudaStepWeight<S>& /*w_hh*/, const at::Tensor& /*x*/) {
    return false;
  }

  static bool reads_stored_input(const DenseWeight& /*w_ih*/, const at::Tensor& /*x*/) { return false; }

  // Half-precision layers compute in their own type here (kHalfKernels): no output to round.
  template <typename S>
  static bool rounds_output(const CudaStepWeight<S>& /*w_hh*/) {
    return false;
  }

  // The recurrent GEMM on cuBLAS, then the pointwise kernel, on the same stream (rows start at 0:
  // there is only one row group).
  template <class Cell, typename S>
  static void recurrent_step(const CudaStepWeight<S>& w_hh, const StepForward<S>& step, int64_t row_begin,
                             int64_t row_end, S* gates, int64_t ld_gates, S beta, const S* /*input*/,
                             const void* /*input_stored*/, const S* /*h_prev*/) {
    TORCH_INTERNAL_ASSERT(row_begin == 0);
    stepwise_steps.fetch_add(1, std::memory_order_relaxed);
    w_hh.gemm(row_end, step.h_state, w_hh.k, beta, gates, ld_gates);
    C10_CUDA_CHECK(launch_forward_step<Cell>(as_cuda(step), row_end, at::cuda::getCurrentCUDAStream()));
  }

  template <class Cell, typename S>
  static void backward_step(const CudaStepWeight<S>& w_hh, const S* grad_gates_after, int64_t after_end,
                            const StepBackward<S>& step, int64_t row_begin, int64_t row_end) {
    TORCH_INTERNAL_ASSERT(row_begin == 0);
    stepwise_steps.fetch_add(1, std::memory_order_relaxed);
    if (grad_gates_after != nullptr) grad_h_prev_from_gates<Cell>(w_hh, grad_gates_after, step.grad_h_state, 0, after_end);
    C10_CUDA_CHECK(launch_backward_step<Cell>(as_cuda(step), row_end, at::cuda::getCurrentCUDAStream()));
  }
};

template <typename S>
void CudaStepWeight<S>::gemm(int64_t m, const S* a, int64_t lda, S beta, S* c, int64_t ldc) const {
  CudaBackend::gemm<S>(handle, false, trans, m, n, k, S(1), a, lda, w, trans ? k : n, beta, c, ldc);
}

TORCH_LIBRARY_IMPL(fused_rnn, CUDA, m) { FUSED_RNN_REGISTER_BACKEND(m, CudaBackend); }

}  // namespace fused_rnn
