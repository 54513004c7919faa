// CPU backend: the per-step GEMMs and the input projection / input gradient on panel-packed
// weights (panels.h), the recurrent one fused with each cell's pointwise pass (vectorised with
// at::vec, spread with at::parallel_for); weight gradients on the same panel kernel, a chunk of
// rows at a time, accumulated in place.
// setup.py builds this file once per instruction set, each copy its own extension module
// (fused_rnn._cpu_avx512 with -mavx512* -DFUSED_RNN_AVX512, _cpu_avx2 with -mavx2 -mfma -mf16c
// -DFUSED_RNN_AVX2, _cpu_default), and fused_rnn imports the best one the CPU runs: at::vec then
// uses 512-, 256- or 128-bit vectors. Separate modules keep each copy's inline functions apart.
#if defined(FUSED_RNN_AVX512)
#define CPU_CAPABILITY_AVX512
#define CPU_CAPABILITY AVX512
#elif defined(FUSED_RNN_AVX2)
#define CPU_CAPABILITY_AVX2
#define CPU_CAPABILITY AVX2
#endif
#include <torch/extension.h>
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <numeric>
#include <optional>
#include <vector>
#include <limits>
#include <type_traits>

#include "../ops.h"
#include "caches.h"
#include "panels.h"
#include "weight_rows.h"

// The Fortran BLAS entry points of the MKL that libtorch_cpu carries (LP64). Weak, so a
// torch built without them still loads; the per-step GEMM then goes through ATen.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
            const int*, const double*, const int*, const double*, double*, const int*) __attribute__((weak));
int MKL_Set_Num_Threads_Local(int threads) __attribute__((weak));
}

// oneDNN's matmul as ATen calls it for its reduced-precision GEMMs: result = beta result + alpha
// mat1 mat2. libtorch_cpu exports it without installing its header (ATen/native/mkldnn/Matmul.h);
// weak, so a torch without it still loads and its GEMMs stay with MKL.
namespace at::native {
void mkldnn_matmul(const at::Tensor& mat1, const at::Tensor& mat2, const at::Tensor& result, float beta,
                   float alpha) __attribute__((weak));
}

namespace fused_rnn {

// Activations on float vectors, which the pointwise passes spend most of their time in.
// e^x = 2^n e^r with n = round(x / ln 2) and r = x - n ln 2 in [-ln2/2, ln2/2] (ln 2 in two parts,
// so r is exact), e^r by a degree-5 polynomial (coefficients fitted to e^r on that interval:
// relative error ~2.5e-7, about 2 ulp), times 2^n (AVX-512's vscalefps; else built in the exponent
// bits, the same product). x is first clamped to [-87.3, 88.3], where n <= 127 and e^x is a normal
// float: above, it gives ~2.2e38 rather than inf, which is all the activations need, as they only
// divide by 1 + e^x (an infinite 1 + e^x would make the refined reciprocal 0 x inf = NaN; from
// 88.38 on, n rounds to 128, whose 2^n is inf: sigmoid(x < -88.4) and tanh(x > 44.2) were NaN
// until 2026-12-05). kNegated gives e^-x, with the same roundings as exp_clamped(-x) but without
// the negation.
template <bool kNegated = false>
FR_HD at::vec::Vectorized<float> exp_clamped(const at::vec::Vectorized<float>& x_in) {
  using V = at::vec::Vectorized<float>;
  constexpr float kLog2e = 1.44269504f, kLn2High = 0.693145751953125f, kLn2Low = 1.428606765330187e-06f;
  // a NaN passes (min/max return it)
  const V x = kNegated ? at::vec::clamp(x_in, V(-88.3f), V(87.3f)) : at::vec::clamp(x_in, V(-87.3f), V(88.3f));
  const V n = (x * V(kNegated ? -kLog2e : kLog2e)).round();
  const V r = kNegated ? at::vec::fnmadd(n, V(kLn2Low), at::vec::fnmsub(n, V(kLn2High), x))  // -x - n ln 2
                       : at::vec::fnmadd(n, V(kLn2Low), at::vec::fnmadd(n, V(kLn2High), x));
  V p = at::vec::fmadd(V(0.008369148708879948f), r, V(0.041917506605386734f));
  p = at::vec::fmadd(p, r, V(0.16666504740715027f));
  p = at::vec::fmadd(p, r, V(0.49998870491981506f));
  p = at::vec::fmadd(p, r, V(1.0f));
  p = at::vec::fmadd(p, r, V(1.0000001192092896f));
#if defined(CPU_CAPABILITY_AVX512)
  return V(_mm512_scalef_ps(p, n));
#else
  using I = at::vec::Vectorized<int32_t>;
  const I two_n = (at::vec::convert_to_int_of_same_size(n) + I(127)) << I(23);
  return p * at::vec::cast<float>(two_n);
#endif
}

// 1 / d for the d >= 1 of sigmoid and tanh: the hardware estimate refined by one Newton step
// (relative error ~1e-7) instead of a division, several times its throughput.
FR_HD at::vec::Vectorized<float> reciprocal(const at::vec::Vectorized<float>& d) {
  using V = at::vec::Vectorized<float>;
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#if defined(CPU_CAPABILITY_AVX512)
  const V r(_mm512_rcp14_ps(d));
#else
  const V r(_mm256_rcp_ps(d));
#endif
  return r * at::vec::fnmadd(d, r, V(2.0f));
#else
  return V(1.0f) / d;
#endif
}

template <typename S>
struct Act<at::vec::Vectorized<S>> {
  using V = at::vec::Vectorized<S>;
  static constexpr bool kFast = std::is_same_v<S, float>;

  static FR_HD V sigmoid(const V& x) {
    if constexpr (kFast) return reciprocal(V(1.0f) + exp_clamped<true>(x));
    else return V(S(1)) / (V(S(1)) + x.neg().exp());
  }
  // tanh(x) = 1 - 2 / (1 + e^{2x}): one exp, far less than Sleef's tanh; its error stays about
  // 1e-7 absolute (relative near 0 it grows, as the parity tests allow).
  static FR_HD V tanh(const V& x) {
    if constexpr (kFast) return V(1.0f) - V(2.0f) * reciprocal(V(1.0f) + exp_clamped(x + x));
    else return x.tanh();
  }
  static FR_HD V relu(const V& x) { return at::vec::clamp_min(x, V(S(0))); }
  static FR_HD V relu_backward(const V& dh, const V& h) { return V::blendv(V(S(0)), dh, h > V(S(0))); }
};

namespace {

template <typename S>
struct VecIO {
  using V = at::vec::Vectorized<S>;
  static V load(const S* p) { return V::loadu(p); }
  static void store(S* p, const V& v) { v.store(p); }
};

template <typename S>
struct ScalarIO {
  static S load(const S* p) { return *p; }
  static void store(S* p, S v) { *p = v; }
};

// Runs `point(b, j, vectorised)` over every row b in [row_begin, row_end) and column chunk
// j < hidden.
template <typename S, typename F>
void for_each_chunk(int64_t row_begin, int64_t row_end, int64_t hidden, int64_t gates, const F& point) {
  constexpr int64_t W = at::vec::Vectorized<S>::size();
  const int64_t full = hidden / W, chunks = full + (hidden % W ? 1 : 0);
  // Waking a second thread costs microseconds: only steps with thousands of gate values
  // are split (a chunk costs roughly `gates` vector activations).
  const int64_t grain = std::max<int64_t>(1, 8192 / (W * gates));
  at::parallel_for(0, (row_end - row_begin) * chunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t b = row_begin + idx / chunks, c = idx % chunks;
      if (c < full) {
        point(b, c * W, true);
      } else {
        for (int64_t j = full * W; j < hidden; ++j) point(b, j, false);
      }
    }
  });
}

// Runs `point(b, j, vectorised)` over rows [row_begin, row_end) and the hidden units of panel p
// (those whose gates its GEMM block has just computed).
template <class P, typename F>
void for_each_panel_unit(const P& panels, int64_t p, int64_t row_begin, int64_t row_end, const F& point) {
  for (int64_t v = 0; v < panels.unit_vectors(); ++v) {
    const int64_t j = panels.unit(p, v), lanes = panels.valid_lanes(p, v);
    for (int64_t b = row_begin; b < row_end; ++b) {
      if (lanes == P::kWidth) point(b, j, true);
      else
        for (int64_t l = 0; l < lanes; ++l) point(b, j + l, false);
    }
  }
}

// Whether a float32 layer computed for a bfloat16 one may multiply in bfloat16 (Panels<float,
// c10::BFloat16>): in the AVX-512 build, on CPUs with AVX512-BF16, and in the AVX2 build, which
// widens the bfloat16 operands to float32 for its FMAs (bf16_instructions.h). Its GEMMs through
// W_ih and W_hh then round their operands — the weights (bfloat16 already), the forward's h_prev
// and x_t, the backward's gate gradients — to bfloat16, as torch.nn's bfloat16 layers do, and so
// do the weight gradients' GEMMs (weight_grad_out), while the gates, the states and their
// gradients stay float32. The weights are then read as stored, or laid out in bfloat16: no copy
// of them in float32, which put the peak memory of a bfloat16 call far above torch.nn's (AVX2,
// LSTM T=100 B=1 I=H=512 inference: 13.3 MiB against 0.6).
bool bf16_products_for(at::ScalarType operands) {
#if defined(CPU_CAPABILITY_AVX512)
  static const bool supported = __builtin_cpu_supports("avx512bf16");
  return operands == at::kBFloat16 && supported;
#elif defined(CPU_CAPABILITY_AVX2)
  return operands == at::kBFloat16;
#else
  (void)operands;
  return false;
#endif
}

// Rows [row_begin, row_end) of a float32 matrix (row stride ld_src, `cols` columns) rounded to
// bfloat16 into the same rows of dst (row stride ld_dst), with a 0 after them where cols is odd:
// an operand of bfloat16 panels, which read pairs.
void round_rows_to_bf16(const float* src, int64_t ld_src, c10::BFloat16* dst, int64_t ld_dst, int64_t row_begin,
                        int64_t row_end, int64_t cols) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    round_to_bf16(src + r * ld_src, dst + r * ld_dst, cols);
    if (cols % 2) dst[r * ld_dst + cols] = c10::BFloat16(0.0f);
  }
}

// The transpose of a float32 matrix (rows x cols, row stride ld_src) rounded to bfloat16: dst is
// cols x rows with row stride ld_dst, a 0 after each row where rows is odd. In 16 x 16 tiles.
void transpose_to_bf16(const float* src, int64_t ld_src, int64_t rows, int64_t cols, c10::BFloat16* dst,
                       int64_t ld_dst) {
  constexpr int64_t kTile = 16;
  at::parallel_for(0, (cols + kTile - 1) / kTile, 4, [&](int64_t begin, int64_t end) {
    float tile[kTile * kTile];
    for (int64_t c0 = begin * kTile; c0 < std::min(cols, end * kTile); c0 += kTile) {
      const int64_t n = std::min(kTile, cols - c0);
      for (int64_t r0 = 0; r0 < rows; r0 += kTile) {
        const int64_t m = std::min(kTile, rows - r0);
        at::vec::transpose_mxn<float>(src + r0 * ld_src + c0, ld_src, tile, kTile, static_cast<int>(m),
                                      static_cast<int>(n));
        for (int64_t j = 0; j < n; ++j) round_to_bf16(tile + j * kTile, dst + (c0 + j) * ld_dst + r0, m);
      }
      if (rows % 2)
        for (int64_t j = 0; j < n; ++j) dst[(c0 + j) * ld_dst + rows] = c10::BFloat16(0.0f);
    }
  });
}

}  // namespace

struct CpuBackend;

// A weight W used as the right operand of every step's GEMM: C[m, n] = A[m, k] op(W) + beta C.
// Used for more than a few steps it is re-laid out once into panels (panels.h); a layer's W_hh
// is then grouped by gate so that the pointwise step can follow each panel's GEMM.
template <typename S>
struct CpuStepWeight {
  const S* w;
  bool trans;
  int64_t k, n;
  Panels<S> panels;
  // Where reads_in_place (steps of one row; forward, calls of under kMinPanelRowSteps rows in all),
  // the steps read the weight where it lies instead (weight_rows.h): `rows` where trans (C = A W^T),
  // else `combinations`.
  WeightRows<S> rows;
  RowCombinations<S> combinations;
  // Or, for the backward's steps of one row multiplying in bfloat16, a bfloat16 W_hh read where it
  // lies, the gate gradients rounded into the first row of `operands`.
  RowCombinations<S, c10::BFloat16> bf16_combinations;
  // Recurrent weights of many rows a step that would be laid out in panels (broadcasts): read in
  // place by `broadcast`, each step's rows of A transposed into `transposed` first.
  BroadcastRows<S> broadcast;
  at::Tensor transposed;
  // Recurrent weights: room for a copy of h_prev where it cannot be read in place (the fused step
  // overwrites h_state while the GEMM of later blocks of units still reads h_prev).
  at::Tensor h_prev_copy;
  int64_t row_groups = 1;
  // Recurrent weights with the input projection folded in: the panels hold [W_hh, W_ih] (k =
  // h_out + folded_input) and every step adds the bias.
  int64_t folded_input = 0;
  at::Tensor bias;
  // The most rows a chunk's input projection takes (CpuBackend::max_projection_chunk_rows).
  int64_t projection_rows = std::numeric_limits<int64_t>::max();
  // Multiplying in bfloat16 (bf16_products_for), the panels are these instead, and each step
  // rounds A's rows (h_prev and x_t; gate gradients) into the same rows of `operands`. A recurrent
  // weight has two such buffers: each step's pointwise passes round the h_new they compute into the
  // one its GEMM does not read, where the next step finds its h_prev (`rounded_in`).
  Panels<S, c10::BFloat16> bf16_panels;
  at::Tensor operands;
  // Or, for the steps of one row, a bfloat16 W_hh read where it lies (bf16_in_place_step), h_prev
  // rounded into the first row of `operands`.
  WeightRows<S, c10::BFloat16> bf16_rows;
  // With the input folded into bfloat16 panels and an even number of inputs, the steps may read a
  // bfloat16 input's rows of x_t as they are (reads_stored_input): as stored, each row's pairs
  // are the panels' pairs, and x_t need not be converted to float32 and rounded back (LSTM B=64
  // I=H=256 inference: 3% of the time, on the calling thread).
  bool stored_input = false;
  // For each row, the operand buffer that holds its last h_new, rounded by the step that computed
  // it (fused_bf16_step), or -1 where no step of this layer call has yet: a row's h_prev, which a
  // step reads from h_state or from the last step's output, is always the last h_new computed for
  // that row, or its initial state. Each step writes its own rows' (row groups, concurrently).
  mutable std::vector<int8_t> rounded_in;

  // The weight as the steps read it (for a recurrent weight W_hh, and W_ih where it is folded in):
  // in S, where w and the folded input's rows point into them, or bfloat16 as stored for bfloat16
  // panels.
  at::Tensor w_data, w_ih_data;

  bool has_panels() const { return panels.defined() || bf16_panels.defined(); }
  bool combines() const { return combinations.defined() || bf16_combinations.defined(); }
  // Whether A's rows are rounded to bfloat16 for the products (bfloat16 panels or W read in place),
  // each padded to the length bf16_padded_k().
  bool multiplies_in_bf16() const { return bf16_panels.defined() || bf16_combinations.defined(); }
  int64_t bf16_padded_k() const {
    return bf16_panels.defined() ? bf16_panels.padded_k() : bf16_combinations.padded_k();
  }

  void gemm(int64_t m, const S* a, int64_t lda, S beta, S* c, int64_t ldc) const;
};

// A weight for the GEMMs outside the time loop, out = x op(W) + bias, applied to every chunk of
// rows on panels (laid out once per call, or a panel at a time as they are used: dense_weight), or
// by MKL; the result goes straight into `out` (which may be a column range of a wider buffer, such
// as the gate columns of the reserve).
template <typename S>
struct CpuDenseWeight {
  // w [n, k] when trans, else [k, n], in S (or bfloat16, where bf16_panels are laid out from it;
  // undefined once panels are laid out from it, or where no rows are to be multiplied); bias [n]
  // or undefined
  at::Tensor w, bias;
  bool trans;
  Panels<S> panels;
  Panels<S, c10::BFloat16> bf16_panels;  // instead of panels, multiplying in bfloat16

  void apply_out(at::Tensor& out, const at::Tensor& x) const;
};

namespace {

// Whether a per-step weight that is not read in place (reads_in_place) is laid out in panels (its
// one-off cost then pays): used for a few steps, or for enough rows in all. Measured on single
// steps (T=1, 2; B=16, 64; H=256, 512) on an AVX-512 machine: MKL runs these GEMMs at 60-100
// GMAC/s on 2 cores, the panels near 250, so from 32 rows the backward's step is faster laid out
// (GRU B64 H512 training T=1 3.15 -> 2.81 ms); 16 rows for the forward's, where it multiplies in
// bfloat16.
constexpr int64_t kMinPanelSteps = 4;
constexpr int64_t kMinRecurrentPanelRows = 16, kMinStepPanelRows = 32;

bool panels_pay(int64_t steps, int64_t max_rows, int64_t min_rows) {
  return steps >= kMinPanelSteps || steps * max_rows >= min_rows;
}

// Whether a per-step weight is read where it lies (weight_rows.h) instead of laid out in panels or
// multiplied by MKL. At one row always: faster than either, and no copy (AVX2, inference, T=100,
// B=1, ms: LSTM I=H=2048 218 -> 138, GRU 194 -> 129, RNN 31 -> 22; I=H=512 7.0 -> 6.6, 6.2 ->
// 5.6, 2.1 -> 1.6; streaming, T=4, I=16: GRU H=1024 4.2 -> 1.4; training, GRU I=H=2048 399 ->
// 298). For C = A W^T (WeightRows: the forward's h_prev W_hh^T) also with more rows, where a call
// multiplies fewer than kMinPanelRowSteps rows in all (steps x rows): the layout, a transposing
// pass over the weight, then costs more than it saves, and the weight's block stays in L1 while
// each row's dot products read it (AVX2 Zen 3, 2 threads, inference, I=H=512, laid out -> in
// place, the panels with W_ih folded in where LSTM and RNN fold it, in place without: T=1 B=16
// LSTM 2.2 -> 1.0 ms, GRU 1.0 -> 0.7, RNN 0.4 -> 0.3; T=1 B=64 LSTM 3.3 -> 2.5; T=2 B=16 LSTM
// 3.6 -> 2.4; T=4 B=16 LSTM 1.49x, GRU 1.16x; 128 rows in all level, B=8 T=16 1.01x, B=16 T=8
// 1.06x; from 256 the panels 3-13% faster, B=4 T=100 15-35%). C = A W (RowCombinations: the
// backward's dgates W_hh) streams the weight once per row: from 2 rows the panels or MKL are
// faster (B=16 T=8 training 20% slower in place, B=8 T=16 25%).
constexpr int64_t kMinPanelRowSteps = 128;
// Read in place, W_hh takes W_ih beside it (recurrent_weight) in calls of at most this many steps
// and rows in all.
constexpr int64_t kMaxFoldedInPlaceSteps = 4, kMaxFoldedInPlaceRows = 64;

bool reads_in_place(bool trans, int64_t steps, int64_t max_rows, at::ScalarType operands) {
  if (bf16_products_for(operands)) return false;
  return max_rows <= 1 || (trans && steps * max_rows < kMinPanelRowSteps);
}

// Runs f(begin, end) over contiguous ranges of the blocks of a weight read in place (WeightRows,
// RowCombinations), in parallel where m rows of work pay for waking the threads (parallel_grain).
template <class W, typename F>
void for_each_block_range(const W& weight, int64_t m, const F& f) {
  at::parallel_for(0, weight.count(), parallel_grain(m * weight.row_work()), f);
}

// Runs a tiny GEMM on the calling thread: waking MKL's pool for it costs more than the GEMM,
// and far more when the cores are busy with other work.
class SingleThreadedIfSmall {
 public:
  explicit SingleThreadedIfSmall(int64_t work) {
    constexpr int64_t kMinParallelWork = int64_t(1) << 18;
    if (work < kMinParallelWork && MKL_Set_Num_Threads_Local) previous_ = MKL_Set_Num_Threads_Local(1);
  }
  ~SingleThreadedIfSmall() {
    if (previous_ >= 0) MKL_Set_Num_Threads_Local(previous_);
  }
  SingleThreadedIfSmall(const SingleThreadedIfSmall&) = delete;
  SingleThreadedIfSmall& operator=(const SingleThreadedIfSmall&) = delete;

 private:
  int previous_ = -1;
};

// set_onednn_gemm (fused_rnn._cpu), first from FUSED_RNN_ONEDNN_GEMM: -1 where MKL lacks AVX-512
// (below), 0 never, 1 wherever oneDNN's float32 matmul runs. And how many GEMMs went to it.
std::atomic<int> onednn_gemm_override{[] {
  const char* value = std::getenv("FUSED_RNN_ONEDNN_GEMM");
  return value == nullptr ? -1 : std::strcmp(value, "0") == 0 ? 0 : std::strcmp(value, "1") == 0 ? 1 : -1;
}()};
std::atomic<int64_t> onednn_gemm_calls{0};

// Whether large float32 GEMMs go to oneDNN's matmul, which ATen calls for its reduced-precision
// GEMMs (at::native::mkldnn_matmul) and refuses float32 without AVX-512 BW/VL/DQ. Where it is
// not set, on CPUs with AVX-512 that are not Intel's: MKL takes its AVX-512 code paths only on
// Intel processors, and on others runs AVX2, half the float32 rate of full-width AVX-512 units
// (AMD Zen 5: 2 x 512-bit FMA a cycle). Zen 5 guest, 2 threads, float32, one call of m x n x k,
// us, oneDNN / MKL: 64 x 256 x 256 41 / 54, 64 x 1024 x 256 113 / 222, 6400 x 2048 x 512 29100 /
// 68200, 4096 x 1024 x 6400 138000 / 274000; 16 x 256 x 64 17 / 7.6 (its wrapper costs ~10 us).
// In IEEE float32 only: a reduced oneDNN matmul precision set in torch (bf16, tf32) would round
// the operands; and not while oneDNN is disabled (torch.backends.mkldnn).
bool onednn_gemm_enabled() {
#if defined(__x86_64__)
  static const bool runs = at::native::mkldnn_matmul != nullptr && __builtin_cpu_supports("avx512f") &&
                           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                           __builtin_cpu_supports("avx512dq");
  static const bool mkl_without_avx512 = !__builtin_cpu_is("intel");
#else
  constexpr bool runs = false, mkl_without_avx512 = false;
#endif
  const int setting = onednn_gemm_override.load(std::memory_order_relaxed);
  if (!runs || setting == 0 || (setting < 0 && !mkl_without_avx512)) return false;
  at::Context& context = at::globalContext();
  const at::Float32Precision precision = context.float32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL);
  return context.userEnabledMkldnn() && precision != at::Float32Precision::BF16 &&
         precision != at::Float32Precision::TF32;
}

// Row-major C[m, n] = alpha op(A) op(B) + beta C on oneDNN where onednn_gemm_enabled, for products
// large enough to repay its wrapper and operands it reads in place (dense, or dense transposed:
// the wrapper copies any other; C's rows may lie ldc apart, written in place as fast: 1600 x 4096
// x 1024 at ldc = n + 16). Returns false, C untouched, elsewhere.
bool onednn_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                 int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  constexpr int64_t kMinProduct = int64_t(1) << 22;
  if (m * n * k < kMinProduct || lda != (trans_a ? m : k) || ldb != (trans_b ? k : n) || !onednn_gemm_enabled())
    return false;
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  const auto operand = [&](const float* p, bool trans, int64_t rows, int64_t cols) {
    const at::Tensor t = at::from_blob(const_cast<float*>(p), {trans ? cols : rows, trans ? rows : cols}, opts);
    return trans ? t.t() : t;
  };
  at::native::mkldnn_matmul(operand(a, trans_a, m, k), operand(b, trans_b, k, n), at::from_blob(c, {m, n}, {ldc, 1}, opts),
                            beta, alpha);
  onednn_gemm_calls.fetch_add(1, std::memory_order_relaxed);
  return true;
}

// Row groups for the steps of a weight laid out in panels: one per thread when every thread
// gets at least kMinGroupRows rows (panels on AMX tiles: kMinAmxGroupRows, a tile's rows) and the
// whole weight fits in half a core's L2 cache. Each thread then runs all the steps of its rows
// without waiting for the others, reading the whole weight at every step. Else 1: all rows at
// once, each step split between the threads by blocks of hidden units, so that each thread reads
// only its part of a larger weight. (On AMX, groups of 8 rows would leave half of each tile
// empty: Xeon guest, bfloat16 inference T=100, in-process, fastest of 15-21 calls, against groups
// of 8: LSTM B=16 I=H=256 1.24x, GRU B=32 I=H=64 1.06x, RNN I=H=128 1.21x; B=32 and 64, level.)
int64_t row_groups_for(int64_t max_rows, int64_t weight_bytes, bool amx = false) {
  constexpr int64_t kMinGroupRows = 8, kMinAmxGroupRows = 16;
  const int64_t l2_bytes = cache_sizes().l2;
  const int64_t threads = at::get_num_threads();
  const int64_t min_rows = amx ? kMinAmxGroupRows : kMinGroupRows;
  if (threads < 2 || max_rows < min_rows * threads || 2 * weight_bytes > l2_bytes) return 1;
  return threads;
}

// Whether the steps of a recurrent weight read it in place where they would lay it out in panels,
// each step transposing its rows of h_prev instead (BroadcastRows): no copy of the weight (48 MiB
// for a GRU's W_hh at H=2048, where torch.nn's whole call of 4 steps of 64 rows peaks at 14 MiB),
// nor a pass to lay it out. For a weight of a quarter of the last-level cache or more, from
// kMinBroadcastRows rows a step, where the steps do not run in row groups (row_groups_for); from
// kMaxQuarterCacheRows rows only for a weight of half the cache, which the panels would stream from
// memory too: below that, panels laid out once and read from L3 by many rows run a long call's
// steps up to 6% faster, and for smaller weights the layout costs less than the panels save.
// (AVX2 Zen 3, 2 threads, in-process, panels -> in place, inference: T=4 B=64 I=H=2048 GRU
// 1.14-1.39x, LSTM 1.15x, RNN 1.01-1.05x; T=30 B=64 GRU I=H=2048 1.14x; T=4 B=64 LSTM I=H=1024
// 1.05x; T=100 B=16 GRU I=H=2048 1.13x; T=20 B=16 I=H=1024 GRU 1.06x, LSTM 1.03x; but T=20 B=64
// I=H=1024 GRU 0.94-0.97x, RNN 0.96x; smaller weights, B=16: T=50 I=H=512 GRU 0.98x, T=100 RNN
// 0.91x, packed T=100 I=H=256 2 layers bidirectional LSTM 0.84x, GRU 0.94x; in row groups, T=100
// B=32 H=128 RNN 0.74x.) Steps of fewer than kMinBroadcastRows rows (packed input) read the weight
// as calls of a few rows do (WeightRows), which pads no rows. A folded weight ([W_hh, W_ih]: no
// other copy of W_ih is laid out) under half the cache is read in place only by at least two
// vectors of rows: with one (16 rows of float32 in AVX-512) each broadcast value of W feeds a
// single FMA, and the loads bound the kernel (AVX-512 Zen 5, 2 threads, in-process, T=100
// inference, in place -> panels: LSTM B=16 I=H=512, folded, 1.23x, in the suite 0.67x -> 1.03x of
// torch.nn, peak 3.4 -> 11.4 MiB against its 14.6; with AVX2's 8 floats a vector, 16 rows are two).
// A hoisted W_hh stays in place there: its panels would be a second copy beside W_ih's (GRU B=16
// I=H=1024 inference 1.23x faster on them, but peaking at 35.5 MiB against torch.nn's 33.4). At 32
// rows panels are faster on Zen 5 too (LSTM 1.11x, GRU 1.11x): not changed.
constexpr int64_t kMinBroadcastRows = 16, kMaxQuarterCacheRows = 48;

template <typename S>
bool broadcasts(int64_t max_rows, int64_t weight_bytes, bool folded, at::ScalarType operands) {
  if (bf16_products_for(operands) || max_rows < kMinBroadcastRows || row_groups_for(max_rows, weight_bytes) > 1)
    return false;
  const int64_t cache = cache_sizes().last_level();
  if (4 * weight_bytes < cache) return false;
  return 2 * weight_bytes >= cache ||
         (max_rows < kMaxQuarterCacheRows && (!folded || max_rows >= 2 * BroadcastRows<S>::kWidth));
}

}  // namespace

struct CpuBackend {
  // Gate buffers of about 1 MiB (forward) and 512 KiB (backward) in float32, sized to stay in cache.
  static constexpr int64_t kForwardChunkValues = int64_t(1) << 18;
  static constexpr int64_t kBackwardChunkValues = int64_t(1) << 17;

  // An inference chunk's input projection reads all of W_ih: where W_ih outgrows half the
  // last-level cache, from memory, so such chunks have at least kMinChunkRows rows (GRU I=H=2048
  // B=64, 30 steps: 652 -> 600 ms; LSTM I=H=2048 B=16 419 -> 403 ms); else the gate buffer stays
  // as small as kForwardChunkValues makes it (GRU I=H=1024 B=16: 2 MiB less than 256 rows take).
  // A call of `rows` rows whose gate values are no more than W_ih's weights (rows <= I) takes them
  // all in one chunk: its projection then runs on panels laid out on use (dense_weight), with no
  // copy of W_ih, which is larger than the whole call's gates.
  template <typename S>
  static int64_t min_projection_chunk_rows(const at::Tensor& w_ih, int64_t rows) {
    if (rows <= w_ih.size(1)) return rows;
    const int64_t bytes = w_ih.numel() * static_cast<int64_t>(sizeof(S));
    return 2 * bytes > cache_sizes().last_level() ? kMinChunkRows : 1;
  }

  // The most rows a chunk of a layer's input projection takes: all it may, except where AMX tiles
  // hoist a projection the steps could have read folded in (amx_hoists_input), whose chunks take
  // at most kAmxProjectionRows: the projection's blocks of 64 rows load each weight tile once
  // from 64 rows, and larger chunks' gates would raise the peak memory above torch.nn's, which
  // folded they did not exceed (bfloat16 LSTM inference T=100 B=16 I=H=256 in chunks of 256 rows:
  // 2.9 MiB against torch.nn's 2.7; folded 2.0, in chunks of 128 rows 2.4).
  static constexpr int64_t kAmxProjectionRows = 128;
  template <typename S>
  static int64_t max_projection_chunk_rows(const CpuStepWeight<S>& w_hh) {
    return w_hh.projection_rows;
  }

  // A reused forward gate buffer's rows are an odd number of cache lines apart, so that a block
  // of rows falls in as many L1 sets as it has rows: at 4H gates of 4 bytes a multiple of 4 KiB
  // (H = 256, 512, ...), a panel's strip of one gate in 16 rows was 16 lines in one 12-way set,
  // which the GEMM's adding of the projected input and the pointwise step's loads evicted from
  // one another. (Xeon guest, bfloat16 LSTM inference T=100: B=16 I=H=256 on one thread, perf, the
  // AMX blocks' adding from 17.6% of the call to 11.1%; in-process, B=64 I=H=256 1.04x folded,
  // 1.11x hoisted, I=H=512 hoisted 1.09x; the float32 grid level.)
  static int64_t gate_row_stride(int64_t width, int64_t element_size) {
    constexpr int64_t kLine = 64;
    const int64_t lines = (width * element_size + kLine - 1) / kLine;
    return (lines | 1) * kLine / element_size;
  }

  // How a weight of the GEMMs outside the time loop is multiplied:
  //  - Where the call's rows go in one chunk, on panels laid out as they are used
  //    (Panels::LaidOutOnUse): the panel kernel without a copy of the whole weight (GRU I=H=2048:
  //    48 MiB of W_ih), each panel multiplied from L2 right after its layout instead of read back
  //    from memory. For x W^T (the input projection) from 16 rows, below which MKL is faster; for
  //    x W (the input gradient, whose layout gathers a strip of every row of W) from 128. (AVX2,
  //    in-process A/B; inference over MKL: GRU T=1 B=16 I=H=512 1.06x, T=2 B=32 1.22x, T=100 B=1
  //    1.05x, T=1 B=64 I=H=1024 1.06x, LSTM T=100 B=1 I=H=256 1.03x; over panels laid out first:
  //    T=4 B=64 GRU I=H=2048 1.09x, RNN I=H=1024 1.04x, LSTM 1.01x, GRU training 1.02x, T=100 B=16
  //    I=H=512 training 0.99-1.01x; x W at 16 rows: GRU T=1 B=16 I=H=1024 training 0.89x.)
  //  - Over several chunks, on panels laid out once (laid out on use, each chunk would lay them out
  //    again: T=100 B=16 I=H=2048 inference 0.90-0.95x), from 128 rows in float32 and float64: the
  //    layout then pays for itself (from 16 rows at batch 1 over 16 to 100 steps, H=256 and 512:
  //    10-30% faster than MKL), but below 128 rows the kept layout of W_ih (4 bytes a weight)
  //    would raise a batch-1 training step's peak memory above torch.nn's (GRU B1 H512: +3 MiB).
  //    Except x W beyond half the last-level cache, which every chunk streams from memory either
  //    way: laid out on use a block of k at a time, with the next block prefetched meanwhile, it
  //    is as fast as the kept layout and saves its copy (backward, T=100, I=H=2048, AVX-512 Zen 4,
  //    in-process A/B against the kept layout: GRU B=16 0.997x, B=64 0.993x, LSTM B=16 1.015x,
  //    B=64 0.992x; peak memory GRU B=16 281 -> 234 MiB, where torch.nn's measured 247-292).
  //  - Multiplying in bfloat16, on bfloat16 panels from 16 rows (MKL would multiply in float32):
  //    laid out on use where the call's rows go in one chunk, x W^T as x W (a batch-1 call of a GRU
  //    at I=H=512 needs 1.5 MiB for its layout of W_ih, 0.8 MiB for all else in the forward, and
  //    its input gradient 1.5 MiB more), else laid out once.
  template <typename S>
  static CpuDenseWeight<S> dense_weight(const at::Tensor& w, bool trans, const at::Tensor& bias, int64_t rows,
                                        int64_t chunk_rows, at::ScalarType operands) {
    constexpr int64_t kMinPanelRows = 128, kFewestPanelRows = 16;
    // No rows (the input folded into the steps' GEMM, or no input gradient wanted): never applied,
    // so no copy of a half-precision w in S either (4 MiB of float32 W_ih at I=512 for a bfloat16
    // LSTM, H=512, and the time to convert it: 1 ms of an 18 ms inference call at B=16).
    if (rows == 0) return CpuDenseWeight<S>{at::Tensor(), at::Tensor(), trans};
    const int64_t k = w.size(trans ? 1 : 0), n = w.size(trans ? 0 : 1);
    const at::Tensor b = bias.defined() ? bias.contiguous() : bias;
    const bool panels_pay = k > 0 && n > 0 && rows >= kFewestPanelRows;
    if constexpr (std::is_same_v<S, float>) {
      if (panels_pay && lays_out_stored<S>(w, operands)) {  // from the bfloat16 weights as they are
        using P = Panels<S, c10::BFloat16>;
        CpuDenseWeight<S> dw{w.contiguous(), b, trans};
        const auto* stored = ptr<c10::BFloat16>(dw.w);
        dw.bf16_panels = chunk_rows >= rows ? P(typename P::LaidOutOnUse{}, stored, trans, k, n)
                                            : P(stored, trans, k, 1, n, Scratch::kInputWeight);
        return dw;
      }
    }
    CpuDenseWeight<S> dw{in_compute_type<S>(w), b, trans};
    if (!panels_pay) return dw;
    const bool streams = 2 * w.numel() * static_cast<int64_t>(sizeof(S)) > cache_sizes().last_level();
    if ((chunk_rows >= rows || (!trans && streams)) && (trans || rows >= kMinPanelRows)) {
      dw.panels = Panels<S>(typename Panels<S>::LaidOutOnUse{}, ptr<S>(dw.w), trans, k, n);
    } else if (rows >= kMinPanelRows) {
      dw.panels = Panels<S>(ptr<S>(dw.w), trans, k, 1, n, Scratch::kInputWeight);
      dw.w = at::Tensor();  // read no more (as without_source)
    }
    return dw;
  }

  // grad_w = g^T x, or += when accumulating: on the panel kernel with x laid out in panels (A = g
  // read transposed, in place) straight into grad_w, else on MKL. No temporary of the result.
  // The panel kernel reads all of g once per panel of x: from L2 while g fits in half of it, else
  // from L3 or memory, where MKL's blocked GEMM, which packs blocks of g to keep them in cache, is
  // faster (AVX2, T=100, training: LSTM B16 H512 7%, B64 H512 15%, RNN B64 H512 15%, LSTM I=H=1024
  // B16 10%; g within half of L2, as LSTM B16 H64 and RNN B1 H64, 3-4% slower on MKL). And it
  // writes grad_w a strip of columns per panel, over all its rows: where grad_w outgrows half of
  // L2 too, MKL's blocks of rows are faster (Zen 4 with AVX2 only, training calls of few rows,
  // in-process: LSTM T=1 B=16 H=512 1.19x, T=16 B=16 H=256 1.15x, GRU T=1 B=32 H=1024 1.13x, RNN
  // T=100 B=1 H=512 1.17x; grad_w within half of L2, H=64, 1.01-1.03x either way).
  // Where bf16_products_for(operands), g and x are rounded to bfloat16 (g transposed, as the
  // kernel reads pairs of k = rows) and multiplied in bfloat16, as torch.nn's bfloat16 layers do.
  // A grad_w in a narrower type than S (not accumulating) is computed a slab of its rows at a time
  // into a buffer in S and rounded into it (by_slabs): no copy of the whole in S. x may be in the
  // storage type `operands`, which bfloat16 panels lay out from as it is (no copy of it in S).
  template <typename S>
  static void weight_grad_out(at::Tensor& grad_w, const at::Tensor& g, const at::Tensor& x, bool accumulate,
                              at::ScalarType operands = at::ScalarType::Undefined) {
    constexpr int64_t kMinPanelRows = 16;
    const bool narrow = grad_w.scalar_type() != c10::CppTypeToScalarType<S>::value;
    TORCH_INTERNAL_ASSERT(!narrow || (!accumulate && grad_w.is_contiguous()), "a narrower weight gradient is written once");
    const int64_t rows = x.size(0);
    const bool panels = rows >= kMinPanelRows && x.is_contiguous() && g.stride(1) == 1 && grad_w.is_contiguous() &&
                        x.size(1) > 0;
    const bool x_stored = x.scalar_type() != c10::CppTypeToScalarType<S>::value;
    if constexpr (std::is_same_v<S, float>) {
      if (panels && bf16_products_for(operands)) {
        using P = Panels<float, c10::BFloat16>;
        const P x_panels = x_stored ? P(ptr<c10::BFloat16>(x), false, rows, 1, x.size(1), Scratch::kGradientPanels)
                                    : P(ptr<float>(x), false, rows, 1, x.size(1), Scratch::kGradientPanels);
        const int64_t ld = x_panels.padded_k();
        // Rows [row, row + len) of grad_w, from g's same columns, into out.
        const auto product = [&](int64_t row, int64_t len, float* out, int64_t ld_out) {
          const at::Tensor g_t = cpu_scratch(Scratch::kGradientOperands, {len, ld}, g.options().dtype(at::kBFloat16));
          transpose_to_bf16(ptr<float>(g) + row, g.stride(0), rows, len, g_t.data_ptr<c10::BFloat16>(), ld);
          x_panels.multiply(len, g_t.data_ptr<c10::BFloat16>(), ld, 1, accumulate ? 1.0f : 0.0f, out, ld_out);
        };
        if (narrow) return by_slabs<S>(grad_w, product);
        return product(0, g.size(1), ptr<float>(grad_w), grad_w.stride(0));
      }
    }
    if (x_stored) return weight_grad_out<S>(grad_w, g, x.to(g.scalar_type()), accumulate, operands);
    if (narrow) {
      return by_slabs<S>(grad_w, [&](int64_t row, int64_t len, S* out, int64_t ld_out) {
        at::Tensor sums = at::from_blob(out, {len, ld_out}, g.options());
        weight_grad_out<S>(sums, part(g, 1, row, len), x, false, operands);
      });
    }
    const int64_t g_bytes = rows * g.size(1) * static_cast<int64_t>(sizeof(S));
    const int64_t grad_w_bytes = grad_w.numel() * static_cast<int64_t>(sizeof(S));
    if (panels && 2 * std::max(g_bytes, grad_w_bytes) <= cache_sizes().l2) {
      const Panels<S> x_panels(ptr<S>(x), false, rows, 1, x.size(1), Scratch::kGradientPanels);
      x_panels.multiply(g.size(1), ptr<S>(g), 1, g.stride(0), S(accumulate ? 1 : 0), ptr<S>(grad_w), grad_w.stride(0));
    } else if (x.stride(1) == 1 && g.stride(1) == 1 && grad_w.is_contiguous()) {
      gemm<S>(true, false, g.size(1), x.size(1), rows, S(1), ptr<S>(g), g.stride(0), ptr<S>(x), x.stride(0),
              S(accumulate ? 1 : 0), ptr<S>(grad_w), grad_w.stride(0));
    } else if (accumulate) {
      grad_w.addmm_(g.t(), x);
    } else {
      at::mm_out(grad_w, g.t(), x);
    }
  }

  // grad_w (in a type narrower than S, [n, cols]) by slabs of its rows, in parallel: product(row,
  // len, out, ld_out) puts rows [row, row + len) in S into a buffer of the thread, which rounds them
  // into grad_w. Slabs of at most kSlabValues values, at least kSlabsPerThread per thread: the
  // buffers take at most a quarter of what grad_w would in S.
  template <typename S, typename F>
  static void by_slabs(at::Tensor& grad_w, const F& product) {
    constexpr int64_t kSlabValues = int64_t(1) << 15, kSlabsPerThread = 4;
    const int64_t n = grad_w.size(0), cols = grad_w.size(1), slabs = kSlabsPerThread * at::get_num_threads();
    const int64_t slab = std::max<int64_t>(1, std::min(kSlabValues / std::max<int64_t>(1, cols), (n + slabs - 1) / slabs));
    const auto options = grad_w.options().dtype(c10::CppTypeToScalarType<S>::value);
    AT_DISPATCH_REDUCED_FLOATING_TYPES(grad_w.scalar_type(), "fused_rnn_weight_grad_slabs", [&] {
      scalar_t* out = grad_w.data_ptr<scalar_t>();
      at::parallel_for(0, (n + slab - 1) / slab, 1, [&](int64_t begin, int64_t end) {
        const at::Tensor sums = cpu_scratch(Scratch::kGradientSlab, {slab, cols}, options);
        for (int64_t b = begin; b < end; ++b) {
          const int64_t row = b * slab, len = std::min(slab, n - row);
          product(row, len, ptr<S>(sums), cols);
          at::vec::convert(ptr<S>(sums), out + row * cols, len * cols);
        }
      });
    });
  }

  static void check_dtype(at::ScalarType t) {
    TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
                "fused_rnn on CPU supports float32, float64, float16 and bfloat16 tensors, got ", t);
  }

  // The kernels are built for float and double; float16 and bfloat16 layers run in float32, their
  // tensors converted on the way in and the results rounded on the way out (layer.h).
  static constexpr bool kHalfKernels = false;
  // No call that runs many steps: for_each_row_group already lets a row group run its steps alone.
  static constexpr bool kPersistentRecurrence = false;

  // Row-major C[m, n] = alpha op(A) op(B) + beta C, as the column-major product C^T = op(B)^T op(A)^T.
  template <typename S>
  static void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, S alpha, const S* a, int64_t lda,
                   const S* b, int64_t ldb, S beta, S* c, int64_t ldc) {
    if (m == 0 || n == 0) return;
    auto blas = [] {
      if constexpr (std::is_same_v<S, float>) return sgemm_;
      else if constexpr (std::is_same_v<S, double>) return dgemm_;
      else return static_cast<void (*)()>(nullptr);
    }();
    if constexpr (std::is_same_v<S, float>) {
      if (onednn_gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)) return;
    }
    if constexpr (std::is_same_v<S, float> || std::is_same_v<S, double>) {
      constexpr int64_t kMax = std::numeric_limits<int>::max();
      if (blas != nullptr && std::max({m, n, k, lda, ldb, ldc}) <= kMax) {
        const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
        const int mi = m, ni = n, ki = k, la = lda, lb = ldb, lc = ldc;
        const SingleThreadedIfSmall threads(m * n * k);
        blas(&tb, &ta, &ni, &mi, &ki, &alpha, b, &lb, a, &la, &beta, c, &lc);
        return;
      }
    }
    const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<S>::value);
    auto view = [&](const S* p, bool trans, int64_t rows, int64_t cols, int64_t ld) {
      const at::Tensor t = at::from_blob(const_cast<S*>(p), {trans ? cols : rows, trans ? rows : cols}, {ld, 1}, opts);
      return trans ? t.t() : t;
    };
    at::Tensor out = at::from_blob(c, {m, n}, {ldc, 1}, opts);
    at::addmm_out(out, out, view(a, trans_a, m, k, lda), view(b, trans_b, k, n, ldb), beta, alpha);
  }

  // Per-step weights are read in place where reads_in_place says so, else laid out in panels once
  // where that pays (panels_pay); else each step's GEMM goes to MKL. Bfloat16 panels are laid out
  // from a bfloat16 weight as it is (the backward's W_hh of a bfloat16 layer: no float32 copy of
  // it, 4 bytes a weight, is made); all else reads w in S.
  //
  // The backward's C = A W (dgates W_hh) of one row a step multiplying in bfloat16 reads the
  // bfloat16 W_hh where it lies too (bf16_combinations), as the forward's steps of one row do: no
  // copy of it in panels (GRU I=H=512 at batch 1: 1.5 MiB, where torch.nn's whole training call
  // peaks at 6.5-6.8), with the same sums. (AVX-512 Zen 4, bfloat16 training at batch 1, T=100,
  // in-process A/B against the panels, with W_ih's input-gradient panels laid out on use and the
  // weight gradients rounded by slabs, against a layout and whole float32 gradients: LSTM
  // I=H=512 1.11x, I=H=256 1.04x, RNN I=H=256 1.09x, GRU I=H=256 1.03x, GRU and RNN I=H=512 level.)
  template <typename S>
  static CpuStepWeight<S> step_weight(const at::Tensor& w_stored, bool trans, int64_t k, int64_t n, int64_t max_rows,
                                      int64_t steps, Scratch slot, at::ScalarType operands) {
    const bool used = k > 0 && n > 0 && steps > 0;
    const bool bf16_in_place = !trans && max_rows <= 1 && lays_out_stored<S>(w_stored, operands);
    const bool in_place = bf16_in_place || reads_in_place(trans, steps, max_rows, operands);
    const bool panels = !in_place && panels_pay(steps, max_rows, kMinStepPanelRows);
    const bool stored = bf16_in_place || (panels && lays_out_stored<S>(w_stored, operands));
    const at::Tensor data = !used ? at::Tensor() : stored ? w_stored.contiguous() : in_compute_type<S>(w_stored);
    const S* w = stored ? nullptr : ptr<S>(data);
    CpuStepWeight<S> sw{w, trans, k, n};
    sw.w_data = data;
    if (!used) return sw;
    if (bf16_in_place) {
      if constexpr (std::is_same_v<S, float>) {
        sw.bf16_combinations = RowCombinations<S, c10::BFloat16>(ptr<c10::BFloat16>(data), k, n);
        sw.operands = cpu_scratch(Scratch::kStateCopy, {max_rows, sw.bf16_combinations.padded_k()},
                                  at::TensorOptions().dtype(at::kBFloat16));
      }
    } else if (in_place) {
      if (trans) sw.rows = WeightRows<S>(w, k, 1, n);
      else sw.combinations = RowCombinations<S>(w, k, n);
    } else if (stored) {
      lay_out<S, c10::BFloat16>(sw, ptr<c10::BFloat16>(data), 1, n, max_rows, slot, nullptr);
    } else if (panels) {
      lay_out<S, S>(sw, w, 1, n, max_rows, slot, nullptr);
    }
    return without_source(std::move(sw));
  }

  // A step weight laid out in panels, which its steps read instead of w: w's tensors let go, so
  // that a half-precision layer's copy in S (4 bytes a weight) goes back to the op's cached blocks
  // for its later buffers.
  template <typename S>
  static CpuStepWeight<S> without_source(CpuStepWeight<S> sw) {
    if (sw.has_panels()) sw.w = nullptr, sw.w_data = at::Tensor(), sw.w_ih_data = at::Tensor();
    return sw;
  }

  // Lays out a step weight's panels of w (`gates` groups of `units` columns; w_tail as in Panels)
  // and its row groups: a weight in S in panels in S; bfloat16 weights, multiplied in bfloat16
  // (lays_out_stored), in bfloat16 panels, with the buffer the steps round their operands into.
  template <typename S, typename W>
  static void lay_out(CpuStepWeight<S>& sw, const W* w, int64_t gates, int64_t units, int64_t max_rows, Scratch slot,
                      const W* w_tail) {
    const int64_t k_tail = sw.folded_input;
    if constexpr (std::is_same_v<W, S>) {
      sw.panels = Panels<S>(w, sw.trans, sw.k, gates, units, slot, w_tail, k_tail);
      sw.row_groups = row_groups_for(max_rows, sw.k * sw.n * static_cast<int64_t>(sizeof(S)));
    } else if constexpr (std::is_same_v<S, float>) {
      sw.bf16_panels = Panels<S, c10::BFloat16>(w, sw.trans, sw.k, gates, units, slot, w_tail, k_tail);
      sw.operands = cpu_scratch(Scratch::kStateCopy, {max_rows, sw.bf16_panels.padded_k()},
                                at::TensorOptions().dtype(at::kBFloat16));
      sw.row_groups = row_groups_for(max_rows, sw.k * sw.n * static_cast<int64_t>(sizeof(c10::BFloat16)),
                                     sw.bf16_panels.amx());
    } else {
      TORCH_INTERNAL_ASSERT(false, "fused_rnn: bfloat16 panels accumulate in float32");
    }
  }

  // Whether a layer's input projection is folded into each step's GEMM, gates = [h_prev, x_t]
  // [W_hh, W_ih]^T + bias ([W_hh, W_ih] has joined_values weights), or hoisted out of the steps: one
  // GEMM over a chunk of steps' inputs (dense_weight), each step then reading W_hh alone. Folded,
  // a step is one GEMM instead of two passes and the projected input never goes through memory,
  // but every step reads W_ih as well as W_hh, which the hoisted GEMM reads once per chunk. So it
  // folds where that costs no memory traffic:
  //  - batches of at least kMinFoldRows rows: fewer share each weight's reads between too few rows,
  //    and one GEMM over all steps' inputs is faster (measured);
  //  - [W_hh, W_ih] as laid out (bfloat16 or S) within half the last-level cache (L3; L2 where
  //    there is none), so that it stays there from step to step beside all else a step touches:
  //    from L3 the panel kernel runs at the FMA rate from 16 rows, while beyond, each step would
  //    stream W_ih from memory as well as W_hh. (AVX2, 32 MiB L3, inference T=50: LSTM I=H=512,
  //    8 MiB, folds at 1.0-1.05x of hoisted; I=H=768, 18 MiB, B16 86 -> 82 ms hoisted; I=H=1024,
  //    32 MiB, B16 195 -> 161 ms, B64 628 -> 575 ms.)
  //  - RNN: only within a quarter of L2 (in S, as measured), where a step is one thin GEMM with
  //    no gate pass to save (B64 H256 and H512 inference 3-7% faster hoisted; LSTM B64 H256
  //    inference 2-3% faster folded).
  // (On AMX tiles, amx_hoists_input decides further.)
  template <class Cell, typename S>
  static bool fold_input_projection(int64_t max_rows, int64_t joined_values, at::ScalarType operands) {
    constexpr int64_t kMinFoldRows = 16;
    const CacheSizes caches = cache_sizes();
    const int64_t panel_bytes = joined_values * (bf16_products_for(operands) ? sizeof(c10::BFloat16) : sizeof(S));
    if (max_rows < kMinFoldRows || 2 * panel_bytes > caches.last_level()) return false;
    return Cell::kGates > 1 || 4 * joined_values * static_cast<int64_t>(sizeof(S)) <= caches.l2;
  }

  // Whether AMX tiles hoist an input projection that fold_input_projection would fold in: where
  // folded, loading W_ih's weight tiles at every step costs more than hoisting saves. A step's
  // product of R rows a thread (its row group's, up to a block's 64) loads each of its weight tiles
  // once for all R rows; folded in, W_ih's cost a row I x n x 2 / R bytes, hoisted I x n x 2 / 64
  // (the projection's 64-row blocks) plus the projected input's trip out to the gate buffer and
  // back, about 16 bytes a gate (fitted to the measurements below): hoisted where
  // I (64 - R) >= 512 R, so never from 64 rows, and at 16 rows from I = 171. And where the panels
  // a thread reads at each step outgrow half its L2, also where its share of W_ih, read from beyond
  // L2 at every step, costs more than the hoisted input's trip (8 bytes a gate, written then read):
  // I x n x 2 / threads >= rows x n x 8, that is I >= 4 x threads x rows. (Xeon guest, bfloat16,
  // T=100, in-process, median of 5-11, hoisted over folded, LSTM inference: B=16 I=H=64 1.02x, 128
  // 0.97x, 256 1.12x, 512 1.34x; B=32 (row groups of 16) I=H=64 0.77x, 128 0.87x, 256 1.25x; B=32
  // I=H=512 1.09x; B=64 I=H=256 (row groups of 32) 0.87x, I=H=512 1.08x; T=50 B=128 I=H=384 and 512
  // 0.87-0.89x; training B=16-32 I=H=256-512 1.04-1.13x.) Not RNN's steps, each a thin product of one
  // gate (benchmark suite, bfloat16 T=100 B=16 I=H=256 inference, hoisted over folded: 0.89-0.90x
  // in three pairs of runs).
  template <class Cell>
  static bool amx_hoists_input(int64_t max_rows, int64_t input_size, int64_t joined_values, at::ScalarType operands) {
    constexpr int64_t kAmxBlockRows = Panels<float, c10::BFloat16>::kAmxRows;
    if (Cell::kGates == 1 || !bf16_products_for(operands) || !amx_bf16_products()) return false;
    const int64_t panel_bytes = joined_values * static_cast<int64_t>(sizeof(c10::BFloat16));
    const int64_t threads = std::max(1, at::get_num_threads()), groups = row_groups_for(max_rows, panel_bytes, true);
    const int64_t rows = std::min(kAmxBlockRows, (max_rows + groups - 1) / groups);
    const int64_t read_by_thread = groups > 1 ? panel_bytes : panel_bytes / threads;
    return input_size * (kAmxBlockRows - rows) >= 512 * rows ||
           (2 * read_by_thread > cache_sizes().l2 && input_size >= 4 * threads * max_rows);
  }

  // Makes a recurrent weight's GEMM [h_prev, x_t] [W_hh, W_ih]^T + bias.
  template <typename S>
  static void fold_input(CpuStepWeight<S>& sw, const at::Tensor& w_ih, const at::Tensor& bias) {
    sw.folded_input = w_ih.size(1);
    sw.k += sw.folded_input;
    sw.bias = bias.defined() ? bias.contiguous()
                             : at::zeros({sw.n}, w_ih.options().dtype(c10::CppTypeToScalarType<S>::value));
  }

  // Whether the weights `w` of a layer computed in S are laid out in bfloat16 panels as they are:
  // bfloat16 weights multiplied in bfloat16 (no float32 copy of them is then made).
  template <typename S>
  static bool lays_out_stored(const at::Tensor& w, at::ScalarType operands) {
    return std::is_same_v<S, float> && w.scalar_type() == at::kBFloat16 && bf16_products_for(operands);
  }

  // w in S, contiguous: itself, or a copy (in memory from cpu_empty's cache of blocks, as
  // layer.h's copies of a half-precision layer's other tensors).
  template <typename S>
  static at::Tensor in_compute_type(const at::Tensor& w) {
    constexpr auto type = c10::CppTypeToScalarType<S>::value;
    if (!w.defined()) return w;
    if (w.scalar_type() == type) return w.contiguous();
    at::Tensor copy = cpu_empty(w.sizes(), w.options().dtype(type));
    copy.copy_(w);
    return copy;
  }

  // W_hh [G*H, H_out] for the recurrent GEMM h_prev W_hh^T, its panels grouped by gate.
  // With w_ih given, the input projection may be folded into each step's GEMM (fold_input_projection):
  // gates = [h_prev, x_t] [W_hh, W_ih]^T + bias. W_hh and W_ih come in the layer's storage type
  // (layer.h): bfloat16 panels are laid out from bfloat16 weights as they are, all else reads a
  // copy in S.
  template <class Cell, typename S>
  static CpuStepWeight<S> recurrent_weight(const at::Tensor& w_hh_stored, int64_t h_out, int64_t hidden,
                                           int64_t max_rows, int64_t steps, const at::Tensor& w_ih_stored,
                                           const at::Tensor& bias, at::ScalarType operands) {
    const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<S>::value);
    const int64_t n = Cell::kGates * hidden;
    // Only bfloat16 panels and the steps of one row (bf16_rows) read bfloat16 weights as they are
    // (reads_in_place and broadcasts never hold for bfloat16 operands).
    const bool bf16 = lays_out_stored<S>(w_hh_stored, operands), bf16_rows = bf16 && max_rows <= 1;
    const bool stored = bf16_rows || (bf16 && panels_pay(steps, max_rows, kMinRecurrentPanelRows));
    const auto kept = [&](const at::Tensor& t) {
      return stored && t.defined() ? t.contiguous() : in_compute_type<S>(t);
    };
    const at::Tensor w_hh_data = kept(w_hh_stored), w_ih = kept(w_ih_stored);
    const S* w_hh = stored ? nullptr : ptr<S>(w_hh_data);
    CpuStepWeight<S> sw{w_hh, true, h_out, n};
    sw.w_data = w_hh_data;
    sw.w_ih_data = w_ih;
    if (h_out <= 0 || hidden <= 0) return sw;
    if (bf16_rows) {
      // Steps of one row, bound by reading W_hh, read it where it lies: no copy of it in panels,
      // which for a GRU at I=H=512 was twice what the rest of its inference call needs, nor the
      // time to lay it out (AVX-512 Zen 4, T=100 inference, in-process A/B against the panels,
      // with the input projection's panels laid out on use: LSTM, GRU and RNN at H=256 and 512
      // 1.09-1.16x, training 1.03-1.28x).
      if constexpr (std::is_same_v<S, float>) {
        sw.bf16_rows = WeightRows<S, c10::BFloat16>(ptr<c10::BFloat16>(w_hh_data), h_out, Cell::kGates, hidden);
        sw.operands = cpu_scratch(Scratch::kStateCopy, {max_rows, h_out}, at::TensorOptions().dtype(at::kBFloat16));
      }
      return sw;
    }
    if (reads_in_place(true, steps, max_rows, operands)) {
      // Calls of a few steps over a few rows fold the input projection in as well: each step then
      // reads W_ih too, but no separate GEMM of a few rows runs, which costs MKL more than the rows'
      // products (AVX2, inference, in-process A/B, folded over hoisted: I=H=512 T=1 B=16 LSTM 1.40x,
      // RNN 1.37x, B=1 1.10x; T=3 B=16 LSTM 1.28x, RNN 1.16x; T=1 B=32 LSTM 1.42x, RNN 1.22x;
      // T=1 B=64 1.04-1.10x, I=H=1024 and 2048 1.02-1.09x; T=4 B=1 I=H=1024 LSTM 1.54x, RNN 1.45x,
      // B=8 I=H=512 1.18x / 1.13x, B=16 I=H=1024 1.19x / 0.98x. Beyond 64 rows LSTM still gains, up
      // to 1.17x at T=3 B=32-42 but 0.95x at T=1 B=127, RNN not: 0.96-1.04x at 96-126 rows, 0.95x
      // at T=1 B=127. Beyond 4 steps each step's read of W_ih costs more as the batch grows: T=5
      // B=1 I=H=1024 LSTM 1.35x, B=8 0.97x; T=6 B=4-8 I=H=1024 LSTM 0.88-0.94x.)
      if (w_ih.defined() && steps <= kMaxFoldedInPlaceSteps && steps * max_rows <= kMaxFoldedInPlaceRows)
        fold_input(sw, w_ih, bias);
      sw.rows = WeightRows<S>(w_hh, sw.k, Cell::kGates, hidden, sw.folded_input ? ptr<S>(w_ih) : nullptr,
                              sw.folded_input);
      sw.h_prev_copy = cpu_scratch(Scratch::kStateCopy, {max_rows, h_out}, opts);
      return sw;
    }
    if (!panels_pay(steps, max_rows, kMinRecurrentPanelRows)) return sw;
    const int64_t joined_values = w_ih.defined() ? (h_out + w_ih.size(1)) * n : 0;
    if (w_ih.defined() && fold_input_projection<Cell, S>(max_rows, joined_values, operands)) {
      if (amx_hoists_input<Cell>(max_rows, w_ih.size(1), joined_values, operands)) sw.projection_rows = kAmxProjectionRows;
      else fold_input(sw, w_ih, bias);
    }
    if (stored) {
      using BF16 = c10::BFloat16;
      lay_out<S, BF16>(sw, ptr<BF16>(w_hh_data), Cell::kGates, hidden, max_rows, Scratch::kRecurrentWeight,
                       sw.folded_input ? ptr<BF16>(w_ih) : nullptr);
    } else {
      const S* w_tail = sw.folded_input ? ptr<S>(w_ih) : nullptr;
      if (broadcasts<S>(max_rows, sw.k * n * static_cast<int64_t>(sizeof(S)), sw.folded_input > 0, operands)) {
        sw.broadcast = BroadcastRows<S>(w_hh, sw.k, Cell::kGates, hidden, w_tail, sw.folded_input);
        sw.rows = WeightRows<S>(w_hh, sw.k, Cell::kGates, hidden, w_tail, sw.folded_input);
        // Steps of fewer than kMinBroadcastRows rows run on `rows` (in_place_step), whose copy of
        // h_prev shares the transposed rows' buffer: a step uses one or the other.
        sw.transposed = cpu_scratch(Scratch::kStateCopy, {sw.broadcast.transposed_size(max_rows)}, opts);
        sw.h_prev_copy = cpu_scratch(Scratch::kStateCopy, {max_rows, h_out}, opts);
        return sw;
      }
      lay_out<S, S>(sw, w_hh, Cell::kGates, hidden, max_rows, Scratch::kRecurrentWeight, w_tail);
      if (sw.panels.defined()) sw.h_prev_copy = cpu_scratch(Scratch::kStateCopy, {max_rows, h_out}, opts);
    }
    if (sw.bf16_panels.defined()) {  // two operand buffers (fused_bf16_step)
      sw.operands = cpu_scratch(Scratch::kStateCopy, {2, max_rows, sw.bf16_panels.padded_k()},
                                at::TensorOptions().dtype(at::kBFloat16));
      sw.rounded_in.assign(max_rows, -1);
      sw.stored_input = sw.folded_input > 0 && sw.folded_input % 2 == 0;
    }
    return without_source(std::move(sw));
  }

  // Up to `groups` row groups, one per thread, of about equal work: with packed input each row
  // counts the steps of [t_lo, t_hi) it is in.
  template <typename F>
  static void for_each_row_group(const Steps& s, int64_t t_lo, int64_t t_hi, int64_t groups, const F& run) {
    const int64_t rows = max_batch(s);
    if (groups <= 1 || at::in_parallel_region()) return run(0, rows);
    // steps_in[r]: the steps of the range that row r is in (batch sizes never increase).
    std::vector<int64_t> steps_in(rows + 1, 0);
    for (int64_t t = t_lo; t < t_hi; ++t) ++steps_in[0], --steps_in[s.batch[t]];
    for (int64_t r = 1; r <= rows; ++r) steps_in[r] += steps_in[r - 1];
    const int64_t total = std::accumulate(steps_in.begin(), steps_in.end() - 1, int64_t(0));
    std::vector<int64_t> bounds{0};
    for (int64_t r = 0, work = 0; r < rows; ++r) {
      work += steps_in[r];
      if (work * groups >= total * static_cast<int64_t>(bounds.size()) && r + 1 < rows) bounds.push_back(r + 1);
    }
    bounds.push_back(rows);
    at::parallel_for(0, static_cast<int64_t>(bounds.size()) - 1, 1, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) run(bounds[g], bounds[g + 1]);
    });
  }

  // The steps on bfloat16 panels that carry h_new, rounded, to the next step (fused_bf16_step)
  // round it into the output too: no float32 output is written, read back and rounded a chunk at a
  // time.
  // So do the steps of one row on a bfloat16 W_hh read in place (bf16_in_place_step).
  template <typename S>
  static bool rounds_output(const CpuStepWeight<S>& w_hh) {
    return (w_hh.bf16_panels.defined() && w_hh.operands.dim() == 3) || w_hh.bf16_rows.defined();
  }

  template <typename S>
  static bool reads_stored_input(const CpuStepWeight<S>& w_hh, const at::Tensor& x) {
    return w_hh.stored_input && x.scalar_type() == at::kBFloat16 && x.is_contiguous();
  }

  // bfloat16 panels multiply a bfloat16 x's rows as they are (apply_out): no float32 copy of them
  // is made to be rounded back.
  template <typename S>
  static bool reads_stored_input(const CpuDenseWeight<S>& w, const at::Tensor& x) {
    return w.bf16_panels.defined() && x.scalar_type() == at::kBFloat16 && x.is_contiguous();
  }

  // gates = h_prev W_hh^T + beta gates (beta 1 onto the projected input; beta 0 for GRU's hidden
  // gates, and with the input folded in, where the GEMM adds x_t W_ih^T + bias itself), then the
  // cell's pointwise step; with panels, each thread runs both for its block of hidden units in one pass.
  template <class Cell, typename S>
  static void recurrent_step(const CpuStepWeight<S>& w_hh, const StepForward<S>& a, int64_t row_begin,
                             int64_t row_end, S* gates, int64_t ld_gates, S beta, const S* input,
                             const void* input_stored, const S* h_prev) {
    const int64_t rows = row_end - row_begin;
    if (rows <= 0) return;
    if constexpr (std::is_same_v<S, float>) {
      if (input_stored != nullptr)  // bfloat16 panels reading a bfloat16 x_t (reads_stored_input)
        return fused_bf16_step<Cell>(w_hh, a, row_begin, row_end, gates, ld_gates, beta, nullptr, h_prev,
                                     static_cast<const c10::BFloat16*>(input_stored));
    }
    TORCH_INTERNAL_ASSERT(input_stored == nullptr);
    if constexpr (std::is_same_v<S, float>) {
      if (w_hh.bf16_rows.defined()) return bf16_in_place_step<Cell>(w_hh, a, row_begin, row_end, gates, ld_gates, beta, h_prev);
    }
    if (w_hh.broadcast.defined())
      return broadcast_step<Cell>(w_hh, a, row_begin, row_end, gates, ld_gates, beta, input, h_prev);
    if (w_hh.rows.defined())
      return in_place_step<Cell>(w_hh, a, row_begin, row_end, gates, ld_gates, beta, input, h_prev);
    if (!w_hh.has_panels()) {
      w_hh.gemm(rows, a.h_state + row_begin * w_hh.k, w_hh.k, beta, gates + row_begin * ld_gates, ld_gates);
      return forward_step<Cell, S>(a, row_begin, row_end);
    }
    if constexpr (std::is_same_v<S, float>) {
      if (w_hh.bf16_panels.defined()) return fused_bf16_step<Cell>(w_hh, a, row_begin, row_end, gates, ld_gates, beta, input, h_prev);
    }
    fused_step<Cell>(w_hh, a, row_begin, row_end, gates, ld_gates, beta, input, h_prev);
  }

  // The pointwise step of panel p's units for rows [first, first + rows), whose gates its GEMM has
  // just summed: inlined into the loop over the rows, which then keeps the activations' constants
  // in registers.
  template <class Cell, class P, typename S>
  static void panel_forward(const P& panels, const StepForward<S>& a, int64_t p, int64_t first, int64_t rows) {
    const auto point = [&](int64_t b, int64_t j, bool vec) __attribute__((always_inline)) {
      if (vec) Cell::template forward<at::vec::Vectorized<S>, VecIO<S>>(a, b, j);
      else Cell::template forward<S, ScalarIO<S>>(a, b, j);
    };
    for_each_panel_unit(panels, p, first, first + rows, point);
  }

  // fused_step multiplying in bfloat16: the rows' h_prev and x_t are rounded into an operand buffer
  // (their float32 values stay as they are), x_t read as stored instead where `stored_input` is
  // given (CpuStepWeight::stored_input). h_prev's rows are there already where the previous step's
  // pointwise passes rounded its h_new, each thread the units it computed, into this buffer:
  // rounding them here, on the calling thread, would read the other threads' h_new from their
  // caches while they wait (LSTM B=64 I=H=256 inference: 4% of the time with the fast rounding).
  // Not with a projection (its h_prev is not the pointwise step's h).
  template <class Cell>
  static void fused_bf16_step(const CpuStepWeight<float>& w_hh, const StepForward<float>& a, int64_t row_begin,
                              int64_t row_end, float* gates, int64_t ld_gates, float beta, const float* input,
                              const float* h_prev, const c10::BFloat16* stored_input = nullptr) {
    using P = Panels<float, c10::BFloat16>;
    const P& panels = w_hh.bf16_panels;
    const int64_t input_size = w_hh.folded_input, h_out = w_hh.k - input_size, ld = panels.padded_k();
    const bool carries = !a.project && w_hh.operands.dim() == 3;
    const float* h_rows = h_prev != nullptr ? h_prev : a.h_state;
    // The GEMM reads the buffer that holds the first row's h_prev (0 where none does yet); the rows
    // whose h_prev is not there are rounded into it now.
    int8_t* const rounded_in = carries ? w_hh.rounded_in.data() : nullptr;
    const int64_t buffer = carries ? std::max<int8_t>(rounded_in[row_begin], 0) : 0;
    c10::BFloat16* operands = w_hh.operands.data_ptr<c10::BFloat16>() + buffer * w_hh.operands.stride(0);
    for (int64_t r = row_begin; r < row_end; ++r)
      if (!carries || rounded_in[r] != buffer) round_rows_to_bf16(h_rows, h_out, operands, ld, r, r + 1, h_out);
    // x_t's rows: as stored, or rounded beside h_prev's.
    const c10::BFloat16* x_rows = stored_input != nullptr ? stored_input : operands + panels.padded_head();
    const int64_t ld_x = stored_input != nullptr ? input_size : ld;
    if (input_size && stored_input == nullptr)
      round_rows_to_bf16(input, input_size, operands + panels.padded_head(), ld, row_begin, row_end, input_size);
    c10::BFloat16* next = carries ? w_hh.operands.data_ptr<c10::BFloat16>() + (1 - buffer) * w_hh.operands.stride(0)
                                  : nullptr;
    const float* bias = input_size ? ptr<float>(w_hh.bias) : nullptr;
    // h_new rounded into the output too (rounds_output): each row is h_out values.
    auto* const output_rounded = static_cast<c10::BFloat16*>(a.output_rounded);
    TORCH_INTERNAL_ASSERT(output_rounded == nullptr || (carries && a.ld_output == h_out));
    const int64_t m = row_end - row_begin;
    // (The closures hold copies, a's too: for_each_panel_block.)
    for_each_panel_block(
        panels, m, panels.sweep_rows(m),
        [=, &panels](int64_t p, int64_t block_first, int64_t rows, P::Sweep sweep) {
          const int64_t first = row_begin + block_first;
          panels.block(p, rows, operands + first * ld, ld, 1, beta, gates + first * ld_gates, ld_gates, bias,
                       x_rows + first * ld_x, ld_x, sweep);
        },
        [=, &panels](int64_t p, int64_t block_first, int64_t rows) {
          panel_forward<Cell>(panels, a, p, row_begin + block_first, rows);
          if (next != nullptr)
            round_panel_units(panels, p, a.h_state, h_out, next, ld, row_begin + block_first, rows, output_rounded);
        });
    if (carries) std::fill(rounded_in + row_begin, rounded_in + row_end, static_cast<int8_t>(1 - buffer));
  }

  // Panel p's units of rows [first, first + rows) of h (h_out columns) rounded into the same place
  // in `operands` (row stride ld), with the 0 after the last unit where h_out is odd, where given,
  // and into `output` (row stride h_out) where given. (Copied from `operands` instead, the output's stores
  // took 1.9% of a bfloat16 LSTM inference call at B=64 I=H=256, perf; rounded again, 0.5%.
  // round_to_bf16 flushes denormals to zero: such an output holds 0 for an h under 1.2e-38.)
  template <class P>
  static void round_panel_units(const P& panels, int64_t p, const float* h, int64_t h_out, c10::BFloat16* operands,
                                int64_t ld, int64_t first, int64_t rows, c10::BFloat16* output = nullptr) {
    for_each_panel_unit(panels, p, first, first + rows, [&](int64_t b, int64_t j, bool vec) {
      const int64_t units = vec ? P::kWidth : 1;
      if (operands != nullptr) {
        round_to_bf16(h + b * h_out + j, operands + b * ld + j, units);
        if (j + units == h_out && h_out % 2) operands[b * ld + h_out] = c10::BFloat16(0.0f);
      }
      if (output != nullptr) round_to_bf16(h + b * h_out + j, output + b * h_out + j, units);
    });
  }

  // Rows [row_begin, row_end) of h_prev for a fused step's GEMM (at row_begin): in place where the
  // caller has them (h_prev not null), else a copy of h_state's rows.
  template <typename S>
  static const S* h_prev_rows(const CpuStepWeight<S>& w_hh, const StepForward<S>& a, int64_t row_begin,
                              int64_t row_end, const S* h_prev) {
    const int64_t h_out = w_hh.k - w_hh.folded_input;
    if (h_prev != nullptr) return h_prev + row_begin * h_out;
    S* copy = w_hh.h_prev_copy.template data_ptr<S>() + row_begin * h_out;
    std::memcpy(copy, a.h_state + row_begin * h_out, (row_end - row_begin) * h_out * sizeof(S));
    return copy;
  }

  // recurrent_step on W_hh read in place (WeightRows; with the input folded in, [W_hh, W_ih] and the
  // bias): each thread takes a contiguous range of blocks of units, as with panels, and runs the
  // cell's pointwise step on each block's units right after its dot products.
  template <class Cell, typename S>
  static void in_place_step(const CpuStepWeight<S>& w_hh, const StepForward<S>& a, int64_t row_begin,
                            int64_t row_end, S* gates, int64_t ld_gates, S beta, const S* input, const S* h_prev) {
    const int64_t input_size = w_hh.folded_input, h_out = w_hh.k - input_size;
    const S* h_rows = h_prev_rows(w_hh, a, row_begin, row_end, h_prev);
    const S* bias = input_size ? ptr<S>(w_hh.bias) : nullptr;
    const S* x_rows = input_size ? input + row_begin * input_size : nullptr;
    const WeightRows<S>& rows = w_hh.rows;
    const int64_t m = row_end - row_begin;
    for_each_block_range(rows, m, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        rows.block(p, m, h_rows, h_out, beta, gates + row_begin * ld_gates, ld_gates, bias, x_rows, input_size);
        panel_forward<Cell>(rows, a, p, row_begin, m);
      }
    });
  }

  // in_place_step on a bfloat16 W_hh (bf16_rows): h_prev's rows rounded to bfloat16 first, as the
  // bfloat16 panels' steps round them; each block's h_new rounded into the output after its
  // pointwise step (rounds_output).
  template <class Cell>
  static void bf16_in_place_step(const CpuStepWeight<float>& w_hh, const StepForward<float>& a, int64_t row_begin,
                                 int64_t row_end, float* gates, int64_t ld_gates, float beta, const float* h_prev) {
    const int64_t h_out = w_hh.k, m = row_end - row_begin;
    c10::BFloat16* h_rows = w_hh.operands.data_ptr<c10::BFloat16>() + row_begin * h_out;
    round_to_bf16((h_prev != nullptr ? h_prev : a.h_state) + row_begin * h_out, h_rows, m * h_out);
    const WeightRows<float, c10::BFloat16>& rows = w_hh.bf16_rows;
    auto* const output = static_cast<c10::BFloat16*>(a.output_rounded);
    TORCH_INTERNAL_ASSERT(output == nullptr || a.ld_output == h_out);
    for_each_block_range(rows, m, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        rows.block(p, m, h_rows, h_out, beta, gates + row_begin * ld_gates, ld_gates);
        panel_forward<Cell>(rows, a, p, row_begin, m);
        if (output != nullptr) round_panel_units(rows, p, a.h_state, h_out, nullptr, 0, row_begin, m, output);
      }
    });
  }

  // recurrent_step on W_hh read in place with A^T (BroadcastRows): h_prev's rows (and x_t's, with the
  // input folded in) transposed first, then each thread's blocks of units as in in_place_step; a
  // step of fewer than kMinBroadcastRows rows (packed input) goes to in_place_step.
  template <class Cell, typename S>
  static void broadcast_step(const CpuStepWeight<S>& w_hh, const StepForward<S>& a, int64_t row_begin,
                             int64_t row_end, S* gates, int64_t ld_gates, S beta, const S* input, const S* h_prev) {
    const int64_t m = row_end - row_begin;
    if (m < kMinBroadcastRows)
      return in_place_step<Cell>(w_hh, a, row_begin, row_end, gates, ld_gates, beta, input, h_prev);
    const int64_t input_size = w_hh.folded_input, h_out = w_hh.k - input_size;
    const S* h_rows = (h_prev != nullptr ? h_prev : a.h_state) + row_begin * h_out;
    const S* bias = input_size ? ptr<S>(w_hh.bias) : nullptr;
    const S* x_rows = input_size ? input + row_begin * input_size : nullptr;
    const BroadcastRows<S>& weight = w_hh.broadcast;
    S* transposed = w_hh.transposed.template data_ptr<S>();
    const int64_t panel_values = 3 * BroadcastRows<S>::kWidth * w_hh.k;
    at::parallel_for(0, weight.panel_count(m), parallel_grain(panel_values), [&](int64_t begin, int64_t end) {
      weight.transpose(begin, end, m, h_rows, h_out, x_rows, input_size, transposed);
    });
    for_each_block_range(weight, m, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        weight.block(p, m, transposed, beta, gates + row_begin * ld_gates, ld_gates, bias);
        panel_forward<Cell>(weight, a, p, row_begin, m);
      }
    });
  }

  template <class Cell, typename S>
  static void fused_step(const CpuStepWeight<S>& w_hh, const StepForward<S>& a, int64_t row_begin,
                         int64_t row_end, S* gates, int64_t ld_gates, S beta, const S* input, const S* h_prev) {
    const int64_t input_size = w_hh.folded_input, h_out = w_hh.k - input_size;
    const S* h_rows = h_prev_rows(w_hh, a, row_begin, row_end, h_prev);
    const S* bias = input_size ? ptr<S>(w_hh.bias) : nullptr;
    const Panels<S>& panels = w_hh.panels;
    const int64_t m = row_end - row_begin;
    for_each_panel_block(
        panels, m, panels.sweep_rows(m),
        [=, &panels](int64_t p, int64_t block_first, int64_t rows, typename Panels<S>::Sweep sweep) {
          const int64_t first = row_begin + block_first;
          const S* x_rows = input_size ? input + first * input_size : nullptr;
          panels.block(p, rows, h_rows + block_first * h_out, h_out, 1, beta, gates + first * ld_gates, ld_gates, bias,
                       x_rows, input_size, sweep);
        },
        [=, &panels](int64_t p, int64_t block_first, int64_t rows) {
          panel_forward<Cell>(panels, a, p, row_begin + block_first, rows);
        });
  }

  template <typename S>
  static void copy(S* dst, const S* src, int64_t n) { std::copy_n(src, n, dst); }

  template <typename S>
  static void add(S* dst, const S* a, const S* b, int64_t n) { std::transform(a, a + n, b, dst, std::plus<S>()); }

  static at::Tensor scratch(Scratch slot, at::IntArrayRef sizes, const at::TensorOptions& options) {
    return cpu_scratch(slot, sizes, options);
  }

  static at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    return cpu_empty(sizes, options);
  }

  struct NoGuard {};
  static NoGuard guard(const c10::Device&) { return {}; }

  template <class Cell, typename S>
  static void forward_step(const StepForward<S>& a, int64_t row_begin, int64_t row_end) {
    for_each_chunk<S>(row_begin, row_end, a.hidden, Cell::kGates, [&](int64_t b, int64_t j, bool vec) {
      if (vec) Cell::template forward<at::vec::Vectorized<S>, VecIO<S>>(a, b, j);
      else Cell::template forward<S, ScalarIO<S>>(a, b, j);
    });
  }

  // grad_h_state (+)= grad_gates_after W_hh over rows [row_begin, after_end) where grad_gates_after
  // is given, then the cell's backward pointwise step over [row_begin, row_end). With panels (or W_hh
  // read in place), each thread runs both for its block of hidden units in one pass: a unit's dL/dh
  // is all its pointwise step needs from the GEMM.
  template <class Cell, typename S>
  static void backward_step(const CpuStepWeight<S>& w_hh, const S* grad_gates_after, int64_t after_end,
                            const StepBackward<S>& a, int64_t row_begin, int64_t row_end) {
    const auto point = [a](int64_t b, int64_t j, bool vec) {  // (a copy: for_each_panel_block)
      if (vec) Cell::template backward<at::vec::Vectorized<S>, VecIO<S>>(a, b, j);
      else Cell::template backward<S, ScalarIO<S>>(a, b, j);
    };
    if (grad_gates_after == nullptr || !(w_hh.has_panels() || w_hh.combines())) {
      if (grad_gates_after != nullptr) grad_h_prev_from_gates<Cell>(w_hh, grad_gates_after, a.grad_h_state, row_begin, after_end);
      return for_each_chunk<S>(row_begin, row_end, a.hidden, Cell::kGates, point);
    }
    const S beta = grad_h_prev_beta<Cell, S>();
    const int64_t h_out = w_hh.n, rows_end = std::max(row_end, after_end);
    // Each thread's units: their dL/dh, then their pointwise step (A: the gate gradients' rows, ld_a
    // values per row).
    const auto combine = [&](const auto& combinations, const auto* a_rows, int64_t ld_a) {
      return for_each_block_range(combinations, after_end - row_begin, [&](int64_t begin, int64_t end) {
        for (int64_t r = row_begin; r < after_end; ++r)
          combinations.combine(begin, end, a_rows + r * ld_a, beta, a.grad_h_state + r * h_out);
        for (int64_t p = begin; p < end; ++p) for_each_panel_unit(combinations, p, row_begin, row_end, point);
      });
    };
    // A = the gate gradients' rows (at row 0: ld_a values per row), on either kind of panels.
    const auto run = [&](const auto& panels, const auto* a_rows, int64_t ld_a) {
      const int64_t m = rows_end - row_begin;
      for_each_panel_block(
          panels, m, panels.sweep_rows(m),
          [=, &panels, grad_h_state = a.grad_h_state](int64_t p, int64_t block_first, int64_t rows, auto sweep) {
            const int64_t first = row_begin + block_first;
            const int64_t gemm_rows = std::clamp<int64_t>(after_end - first, 0, rows);
            if (gemm_rows > 0)
              panels.block(p, gemm_rows, a_rows + first * ld_a, ld_a, 1, beta, grad_h_state + first * h_out, h_out,
                           nullptr, nullptr, 0, sweep);
          },
          [=, &panels](int64_t p, int64_t block_first, int64_t rows) {
            const int64_t first = row_begin + block_first;
            for_each_panel_unit(panels, p, first, std::min(first + rows, row_end), point);
          });
    };
    if constexpr (std::is_same_v<S, float>) {
      if (w_hh.multiplies_in_bf16()) {
        const int64_t ld = w_hh.bf16_padded_k();
        c10::BFloat16* operands = w_hh.operands.template data_ptr<c10::BFloat16>();
        round_rows_to_bf16(grad_gates_after, w_hh.k, operands, ld, row_begin, after_end, w_hh.k);
        const c10::BFloat16* rounded = operands;
        if (w_hh.bf16_panels.defined()) return run(w_hh.bf16_panels, rounded, ld);
        return combine(w_hh.bf16_combinations, rounded, ld);
      }
    }
    if (w_hh.combinations.defined()) return combine(w_hh.combinations, grad_gates_after, w_hh.k);
    run(w_hh.panels, grad_gates_after, w_hh.k);
  }
};

template <typename S>
void CpuDenseWeight<S>::apply_out(at::Tensor& out, const at::Tensor& x) const {
  const int64_t m = x.size(0);
  if (m == 0 || out.size(1) == 0) return;
  if constexpr (std::is_same_v<S, float>) {
    if (bf16_panels.defined()) {
      TORCH_INTERNAL_ASSERT(x.is_contiguous() && out.stride(1) == 1);
      const int64_t k = bf16_panels.k(), ld = bf16_panels.padded_k();
      const bool stored = x.scalar_type() == at::kBFloat16;  // (reads_stored_input)
      if (stored && ld == k)  // rows of pairs as the panels read them
        return bf16_panels.multiply(m, ptr<c10::BFloat16>(x), k, 1, 0.0f, ptr<float>(out), out.stride(0),
                                    ptr<float>(bias));
      // Else the rows go into a buffer: rounded from float32, or copied, each padded to pairs.
      at::Tensor operands = cpu_scratch(Scratch::kInputCopy, {m, ld}, x.options().dtype(at::kBFloat16));
      c10::BFloat16* rows = operands.data_ptr<c10::BFloat16>();
      at::parallel_for(0, m, 256, [&](int64_t begin, int64_t end) {
        if (!stored) return round_rows_to_bf16(ptr<float>(x), k, rows, ld, begin, end, k);
        for (int64_t r = begin; r < end; ++r) {
          std::copy_n(ptr<c10::BFloat16>(x) + r * k, k, rows + r * ld);
          std::fill(rows + r * ld + k, rows + (r + 1) * ld, c10::BFloat16(0.0f));
        }
      });
      bf16_panels.multiply(m, rows, ld, 1, 0.0f, ptr<float>(out), out.stride(0), ptr<float>(bias));
      return;
    }
  }
  if (!panels.defined() && out.stride(1) == 1 && x.stride(1) == 1) {
    // Straight to BLAS, the bias first copied into each row of out: no ATen op (each costs about
    // as much as the whole GEMM of a single small step).
    const int64_t k = x.size(1), n = out.size(1), ld_out = out.stride(0);
    S* c = ptr<S>(out);
    if (bias.defined())
      for (int64_t r = 0; r < m; ++r) std::copy_n(ptr<S>(bias), n, c + r * ld_out);
    return CpuBackend::gemm<S>(false, trans, m, n, k, S(1), ptr<S>(x), x.stride(0), ptr<S>(w), trans ? k : n,
                               S(bias.defined() ? 1 : 0), c, ld_out);
  }
  if (!panels.defined()) {
    const at::Tensor op_w = trans ? w.t() : w;
    if (bias.defined()) at::addmm_out(out, bias, x, op_w);
    else at::mm_out(out, x, op_w);
    return;
  }
  TORCH_INTERNAL_ASSERT(x.is_contiguous() && out.stride(1) == 1);
  panels.multiply(m, ptr<S>(x), panels.k(), 1, S(0), ptr<S>(out), out.stride(0), ptr<S>(bias));
}

template <typename S>
void CpuStepWeight<S>::gemm(int64_t m, const S* a, int64_t lda, S beta, S* c, int64_t ldc) const {
  if (m == 0) return;
  // C's rows from A's (ld_a values apart) on a weight read in place by rows of A.
  const auto combine_rows = [&](const auto& combinations, const auto* a_rows, int64_t ld_a) {
    return for_each_block_range(combinations, m, [&](int64_t begin, int64_t end) {
      for (int64_t r = 0; r < m; ++r) combinations.combine(begin, end, a_rows + r * ld_a, beta, c + r * ldc);
    });
  };
  if constexpr (std::is_same_v<S, float>) {
    if (multiplies_in_bf16()) {
      // A's rows rounded into a buffer of the calling thread, not `operands`: row groups may call
      // this at once, each with its rows from a[0].
      const int64_t ld = bf16_padded_k();
      const at::Tensor rounded_rows = cpu_scratch(Scratch::kGemmOperands, {m, ld}, at::TensorOptions().dtype(at::kBFloat16));
      c10::BFloat16* rounded = rounded_rows.data_ptr<c10::BFloat16>();
      round_rows_to_bf16(a, lda, rounded, ld, 0, m, k);
      if (bf16_panels.defined()) return bf16_panels.multiply(m, rounded, ld, 1, beta, c, ldc);
      return combine_rows(bf16_combinations, static_cast<const c10::BFloat16*>(rounded), ld);
    }
  }
  if (rows.defined()) {
    return for_each_block_range(rows, m, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) rows.block(p, m, a, lda, beta, c, ldc);
    });
  }
  if (combinations.defined()) return combine_rows(combinations, a, lda);
  if (!panels.defined()) return CpuBackend::gemm<S>(false, trans, m, n, k, S(1), a, lda, w, trans ? k : n, beta, c, ldc);
  panels.multiply(m, a, lda, 1, beta, c, ldc);
}

TORCH_LIBRARY_IMPL(fused_rnn, CPU, m) { FUSED_RNN_REGISTER_BACKEND(m, CpuBackend); }

}  // namespace fused_rnn

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fused_rnn's CPU kernels for one instruction set; importing the module registers them";
#if defined(FUSED_RNN_AVX512)
  m.attr("instruction_set") = "avx512";
#elif defined(FUSED_RNN_AVX2)
  m.attr("instruction_set") = "avx2";
#else
  m.attr("instruction_set") = "default";
#endif
  m.attr("bfloat16_products") = fused_rnn::bf16_products_for(at::kBFloat16);
  m.def("amx_products", [] { return fused_rnn::bf16_products_for(at::kBFloat16) && fused_rnn::amx_bf16_products(); },
        "Whether bfloat16 layers' products run on AMX tiles (CPUs with AMX-BF16), as set");
  m.def("set_amx_products", [](bool enabled) { fused_rnn::amx_override = enabled ? -1 : 0; },
        pybind11::arg("enabled") = true,
        "False: bfloat16 products on the AVX512-BF16 kernel even where AMX would run them (the next calls)");
  m.def("onednn_gemm", &fused_rnn::onednn_gemm_enabled,
        "Whether the large float32 GEMMs that do not run on fused_rnn's panels (mostly the weight "
        "gradients over chunks of many rows) run on oneDNN rather than MKL, as set");
  m.def("set_onednn_gemm", [](std::optional<bool> enabled) {
        fused_rnn::onednn_gemm_override = enabled.has_value() ? int(*enabled) : -1;
      }, pybind11::arg("enabled") = std::nullopt,
      "True: on oneDNN wherever it runs; False: on MKL; None: on oneDNN where MKL lacks AVX-512 (not Intel)");
  m.def("onednn_gemm_calls", [] { return fused_rnn::onednn_gemm_calls.load(); },
        "How many GEMMs have run on oneDNN in this process");
  m.def("cache_sizes", [] {
        const fused_rnn::CacheSizes sizes = fused_rnn::cache_sizes();
        return std::make_pair(sizes.l2, sizes.l3);
      }, "(L2 bytes per core, shared L3 bytes) as the CPU kernels' rules see them (0: no L3)");
  m.def("set_cache_sizes", [](int64_t l2, int64_t l3) {
        fused_rnn::l2_override = l2;
        fused_rnn::l3_override = l3;
      }, pybind11::arg("l2") = 0, pybind11::arg("l3") = -1,
      "Overrides the cache sizes the CPU kernels' rules see (l2 <= 0, l3 < 0: the detected ones)");
  m.def("empty_cache", &fused_rnn::release_cpu_memory,
        "Frees the CPU memory kept between calls: cached blocks of freed outputs and reserves, and "
        "the calling thread's scratch buffers.");
}
