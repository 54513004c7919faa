// The persistent recurrent kernels: persistent_steps.h's step loops on the GPU. One CTA per
// multiprocessor at most, each holding its slice of W_hh in shared memory for the whole launch;
// all CTAs co-resident (cooperative launch), so a step ends at a grid-wide barrier instead of a
// kernel boundary. Two barriers, chosen at launch: cooperative groups' grid.sync(), or a counter
// that each CTA bumps (release) and waits on (acquire).
#include <cooperative_groups.h>

#include <atomic>
#include <cuda/atomic>

#include "element_io.h"
#include "persistent.h"

namespace fused_rnn {
namespace persistent {
namespace {

extern __shared__ __align__(16) unsigned char shared_memory[];

// mma.sync m16n8k16 with float accumulators: d += a b (fragments as persistent_plan.h says).
template <typename S>
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

template <>
__device__ __forceinline__ void mma<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();  // the planner runs persistent kernels on compute capability 8.0 and later only
#endif
}

template <>
__device__ __forceinline__ void mma<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();
#endif
}

// float32: each thread's 4x4 tiles, float4 loads from M and the vector tile, exact FMA.
__device__ __forceinline__ void fma_products(const Layout& l, const float* m, const float* v, float* partials,
                                             int tid) {
  const int32_t tasks = fma_task_count(l);
  for (int32_t t = tid; t < tasks; t += kThreads) {
    const FmaTask task = fma_task(l, t);
    const float* m_rows = m + int64_t(task.row) * l.ld_m;
    const float* v_rows = v + int64_t(task.batch) * l.ld_v;
    float acc[4][4] = {};
    for (int32_t g = task.granules.begin; g < task.granules.end; ++g) {
      float4 w[4], h[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        w[i] = *reinterpret_cast<const float4*>(m_rows + i * l.ld_m + 4 * g);
        h[i] = *reinterpret_cast<const float4*>(v_rows + i * l.ld_v + 4 * g);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          acc[i][j] = fmaf(w[i].x, h[j].x, acc[i][j]);
          acc[i][j] = fmaf(w[i].y, h[j].y, acc[i][j]);
          acc[i][j] = fmaf(w[i].z, h[j].z, acc[i][j]);
          acc[i][j] = fmaf(w[i].w, h[j].w, acc[i][j]);
        }
      }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) partials[partial_index(l, task.slice, task.row + i, task.batch + j)] = acc[i][j];
    }
  }
}

// float16 / bfloat16: each warp's m16 tiles against every n8 tile of the batch tile, on the tensor
// cores. The accumulators stay in registers: n tiles past the batch tile are skipped, not indexed.
template <typename S>
__device__ __forceinline__ void mma_products(const Layout& l, const S* m, const S* v, float* partials, int tid) {
  const int32_t warp = tid / 32, lane = tid % 32, n_tiles = l.batch_tile / 8, tasks = mma_task_count(l);
  for (int32_t t = warp; t < tasks; t += kWarps) {
    const MmaTask task = mma_task(l, t);
    float acc[kMaxNTiles][4] = {};
    for (int32_t k_step = task.granules.begin; k_step < task.granules.end; ++k_step) {
      uint32_t a[4];
#pragma unroll
      for (int r = 0; r < 4; ++r)
        a[r] = *reinterpret_cast<const uint32_t*>(m + mma_a_offset(l, task.m_tile, k_step, lane, r));
#pragma unroll
      for (int nt = 0; nt < kMaxNTiles; ++nt) {
        if (nt < n_tiles) {
          const uint32_t b[2] = {*reinterpret_cast<const uint32_t*>(v + mma_b_offset(l, nt, k_step, lane, 0)),
                                 *reinterpret_cast<const uint32_t*>(v + mma_b_offset(l, nt, k_step, lane, 1))};
          mma<S>(acc[nt], a, b);
        }
      }
    }
#pragma unroll
    for (int nt = 0; nt < kMaxNTiles; ++nt) {
      if (nt < n_tiles) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const Coord c = mma_c_coord(lane, e);
          partials[partial_index(l, task.slice, task.m_tile * 16 + c.row, nt * 8 + c.col)] = acc[nt][e];
        }
      }
    }
  }
}

// persistent_steps.h's execution model on the GPU: one CUDA thread per thread, one CTA per CTA.
template <bool kGridSync>
struct DeviceExec {
  unsigned long long* barrier;    // the counter barrier's arrivals, zeroed before the launch
  unsigned long long target = 0;  // arrivals that complete the next barrier

  template <typename S>
  using Math = typename MathType<S>::type;
  template <typename S>
  using IO = ElementIO<S, Math<S>>;

  __device__ int64_t cta() const { return blockIdx.x; }

  template <class F>
  __device__ void threads(const F& f) const {
    f(static_cast<int>(threadIdx.x));
    __syncthreads();
  }

  __device__ void grid_sync() {
    if constexpr (kGridSync) {
      cooperative_groups::this_grid().sync();
    } else {
      target += gridDim.x;
      __syncthreads();
      if (threadIdx.x == 0) {
        // The CTA's writes, ordered before this thread's by the barrier above, are released with
        // the arrival; the loads after the wait acquire every other CTA's.
        cuda::atomic_ref<unsigned long long, cuda::thread_scope_device> arrivals(*barrier);
        __threadfence();
        arrivals.fetch_add(1, cuda::memory_order_release);
        while (arrivals.load(cuda::memory_order_acquire) < target) __nanosleep(32);
      }
      __syncthreads();
    }
  }

  template <typename T>
  __device__ T* shared(int64_t offset) const {
    return reinterpret_cast<T*>(shared_memory + offset);
  }
  template <typename T>
  __device__ T get(const T* p) const {
    return *p;
  }
  template <typename T>
  __device__ void put(T* p, T value) const {
    *p = value;
  }
  // Written by other CTAs during this launch: read from L2, never from a stale L1 line.
  template <typename T>
  __device__ T exchanged(const T* p) const {
    return __ldcg(p);
  }
  template <typename T>
  __device__ void copy16_exchanged(T* dst, const T* src) const {
    *reinterpret_cast<uint4*>(dst) = __ldcg(reinterpret_cast<const uint4*>(src));
  }
  template <typename T>
  __device__ void zero16(T* dst) const {
    *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
  }

  __device__ void products(const Layout& l, const float* m, const float* v, float* partials, int tid) const {
    fma_products(l, m, v, partials, tid);
  }
  template <typename S>
  __device__ void products(const Layout& l, const S* m, const S* v, float* partials, int tid) const {
    mma_products<S>(l, m, v, partials, tid);
  }
};

template <class Cell, typename S, bool kGridSync>
__global__ void __launch_bounds__(kThreads, 1) forward_kernel(const ForwardArgs<S> args, unsigned long long* barrier) {
  DeviceExec<kGridSync> x{barrier};
  forward_steps<Cell, S>(x, args);
}

template <class Cell, typename S, bool kGridSync>
__global__ void __launch_bounds__(kThreads, 1) backward_kernel(const BackwardArgs<S> args, unsigned long long* barrier) {
  DeviceExec<kGridSync> x{barrier};
  backward_steps<Cell, S>(x, args);
}

// Lets kKernel use `bytes` of dynamic shared memory on the current device (more than 48 KiB needs
// asking). Asked once per device and size reached, so that later launches and occupancy queries,
// those captured into CUDA graphs included, call nothing but the launch.
template <auto kKernel>
cudaError_t allow_shared_memory(int64_t bytes) {
  constexpr int kDevices = 64;
  static std::atomic<int64_t> allowed[kDevices] = {};
  int device = 0;
  const cudaError_t found = cudaGetDevice(&device);
  if (found != cudaSuccess) return found;
  if (device < kDevices && bytes <= allowed[device].load(std::memory_order_relaxed)) return cudaSuccess;
  const cudaError_t set =
      cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (set == cudaSuccess && device < kDevices) {
    int64_t before = allowed[device].load(std::memory_order_relaxed);
    while (before < bytes && !allowed[device].compare_exchange_weak(before, bytes)) {
    }
  }
  return set;
}

template <auto kKernel, class Args>
cudaError_t launch(const Args& args, bool grid_sync, unsigned long long* barrier, cudaStream_t stream) {
  const Layout& l = args.layout;
  if (!grid_sync) {
    const cudaError_t zeroed = cudaMemsetAsync(barrier, 0, sizeof(unsigned long long), stream);
    if (zeroed != cudaSuccess) return zeroed;
  }
  const cudaError_t limit = allow_shared_memory<kKernel>(l.smem_bytes);
  if (limit != cudaSuccess) return limit;
  // Cooperative: the launch fails rather than start CTAs that could not all be resident at once
  // (a barrier waiting on a CTA that never starts would hang the GPU).
  cudaLaunchAttribute cooperative{};
  cooperative.id = cudaLaunchAttributeCooperative;
  cooperative.val.cooperative = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned>(l.ctas));
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = static_cast<size_t>(l.smem_bytes);
  config.stream = stream;
  config.attrs = &cooperative;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kKernel, args, barrier);
}

template <auto kKernel>
cudaError_t occupancy(int64_t smem_bytes, int* blocks) {
  const cudaError_t limit = allow_shared_memory<kKernel>(smem_bytes);
  if (limit != cudaSuccess) return limit;
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, kKernel, kThreads, static_cast<size_t>(smem_bytes));
}

}  // namespace

template <class Cell, typename S>
cudaError_t launch_forward(const ForwardArgs<S>& args, bool grid_sync, unsigned long long* barrier,
                           cudaStream_t stream) {
  return grid_sync ? launch<forward_kernel<Cell, S, true>>(args, grid_sync, barrier, stream)
                   : launch<forward_kernel<Cell, S, false>>(args, grid_sync, barrier, stream);
}

template <class Cell, typename S>
cudaError_t launch_backward(const BackwardArgs<S>& args, bool grid_sync, unsigned long long* barrier,
                            cudaStream_t stream) {
  return grid_sync ? launch<backward_kernel<Cell, S, true>>(args, grid_sync, barrier, stream)
                   : launch<backward_kernel<Cell, S, false>>(args, grid_sync, barrier, stream);
}

template <class Cell, typename S>
cudaError_t blocks_per_multiprocessor(bool backward, bool grid_sync, int64_t smem_bytes, int* blocks) {
  if (backward)
    return grid_sync ? occupancy<backward_kernel<Cell, S, true>>(smem_bytes, blocks)
                     : occupancy<backward_kernel<Cell, S, false>>(smem_bytes, blocks);
  return grid_sync ? occupancy<forward_kernel<Cell, S, true>>(smem_bytes, blocks)
                   : occupancy<forward_kernel<Cell, S, false>>(smem_bytes, blocks);
}

#define FUSED_RNN_INSTANTIATE_PERSISTENT(Cell, S)                                                                  \
  template cudaError_t launch_forward<Cell, S>(const ForwardArgs<S>&, bool, unsigned long long*, cudaStream_t);   \
  template cudaError_t launch_backward<Cell, S>(const BackwardArgs<S>&, bool, unsigned long long*, cudaStream_t); \
  template cudaError_t blocks_per_multiprocessor<Cell, S>(bool, bool, int64_t, int*);

#define FUSED_RNN_INSTANTIATE_PERSISTENT_CELL(Cell)  \
  FUSED_RNN_INSTANTIATE_PERSISTENT(Cell, float)      \
  FUSED_RNN_INSTANTIATE_PERSISTENT(Cell, __half)     \
  FUSED_RNN_INSTANTIATE_PERSISTENT(Cell, __nv_bfloat16)

FUSED_RNN_INSTANTIATE_PERSISTENT_CELL(LstmCell)
FUSED_RNN_INSTANTIATE_PERSISTENT_CELL(GruCell)
FUSED_RNN_INSTANTIATE_PERSISTENT_CELL(RnnCell)

}  // namespace persistent
}  // namespace fused_rnn
