// CPU backend: the per-step GEMMs and the input projection / input gradient on panel-packed
// weights (panels.h), the recurrent one fused with each cell's pointwise pass (vectorised with
// at::vec, spread with at::parallel_for); weight gradients on oneDNN (through ATen's mkldnn ops)
// where they are large enough for its per-call overhead, else on MKL.
// setup.py adds -mavx512* or -mavx2 -mfma -mf16c as the building CPU allows: at::vec then
// uses 512- or 256-bit vectors.
#if defined(FUSED_RNN_AVX512)
#define CPU_CAPABILITY_AVX512
#define CPU_CAPABILITY AVX512
#elif defined(FUSED_RNN_AVX2)
#define CPU_CAPABILITY_AVX2
#define CPU_CAPABILITY AVX2
#endif
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>

#include "../ops.h"
#include "panels.h"

// The Fortran BLAS entry points of the MKL that libtorch_cpu carries (LP64). Weak, so a
// torch built without them still loads; the per-step GEMM then goes through ATen.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
            const int*, const double*, const int*, const double*, double*, const int*) __attribute__((weak));
int MKL_Set_Num_Threads_Local(int threads) __attribute__((weak));
}

namespace fused_rnn {

template <typename S>
struct Act<at::vec::Vectorized<S>> {
  using V = at::vec::Vectorized<S>;
  // float: at::vec's exp_u20 (error ~20 ulp, about 1e-6 relative) costs a fraction of Sleef's
  // exp; it clamps its argument, so a NaN is put back.
  static V exp(const V& x) {
    if constexpr (std::is_same_v<S, float>) return V::blendv(x.exp_u20(), x, x.isnan());
    else return x.exp();
  }
  // 1 / d for the d >= 1 of sigmoid and tanh. float: the hardware estimate refined by one
  // Newton step (error ~1e-7 relative) instead of a division, several times its throughput.
  static V reciprocal(const V& d) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<S, float>) {
      const __m512 r = _mm512_rcp14_ps(d);
      const V refined(_mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f))));
      return V::blendv(refined, V(0.0f), d == V(std::numeric_limits<float>::infinity()));
    }
#elif defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<S, float>) {
      const __m256 r = _mm256_rcp_ps(d);
      const V refined(_mm256_mul_ps(r, _mm256_fnmadd_ps(d, r, _mm256_set1_ps(2.0f))));
      return V::blendv(refined, V(0.0f), d == V(std::numeric_limits<float>::infinity()));
    }
#endif
    return V(S(1)) / d;
  }
  static V sigmoid(const V& x) { return reciprocal(V(S(1)) + exp(x.neg())); }
  // float: tanh(x) = 1 - 2 / (1 + e^{2x}) costs one exp, far less than Sleef's tanh; its error
  // stays about 1e-6 absolute (relative near 0 it grows, as the parity tests allow).
  static V tanh(const V& x) {
    if constexpr (std::is_same_v<S, float>) return V(1.0f) - V(2.0f) * reciprocal(V(1.0f) + exp(x + x));
    else return x.tanh();
  }
  static V relu(const V& x) { return at::vec::clamp_min(x, V(S(0))); }
  static V relu_backward(const V& dh, const V& h) { return V::blendv(V(S(0)), dh, h > V(S(0))); }
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

// Runs `point(b, j, vectorised)` over every row b < batch and column chunk j < hidden.
template <typename S, typename F>
void for_each_chunk(int64_t batch, int64_t hidden, int64_t gates, const F& point) {
  constexpr int64_t W = at::vec::Vectorized<S>::size();
  const int64_t full = hidden / W, chunks = full + (hidden % W ? 1 : 0);
  // Waking a second thread costs microseconds: only steps with thousands of gate values
  // are split (a chunk costs roughly `gates` vector activations).
  const int64_t grain = std::max<int64_t>(1, 8192 / (W * gates));
  at::parallel_for(0, batch * chunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t b = idx / chunks, c = idx % chunks;
      if (c < full) {
        point(b, c * W, true);
      } else {
        for (int64_t j = full * W; j < hidden; ++j) point(b, j, false);
      }
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
  at::Tensor h_prev;  // recurrent weights: a copy of the step's h_prev, which the fused step overwrites

  void gemm(int64_t m, const S* a, int64_t lda, S beta, S* c, int64_t ldc) const;
};

// A weight for the GEMMs outside the time loop, out = x op(W) + bias, laid out in panels once per
// call and applied to every chunk of rows; the result goes straight into `out` (which may be a
// column range of a wider buffer, such as the gate columns of the reserve).
template <typename S>
struct CpuDenseWeight {
  at::Tensor w, bias;  // w [n, k] when trans, else [k, n]; bias [n] or undefined
  bool trans;
  Panels<S> panels;

  void apply_out(at::Tensor& out, const at::Tensor& x) const;
};

namespace {

// Multiply-adds from which a weight gradient goes to oneDNN rather than MKL (measured on AVX-512
// AMD EPYC: below about a million, oneDNN's per-call overhead outweighs its speed).
constexpr int64_t kOnednnMinWork = int64_t(1) << 20;

// Steps from which a per-step weight is laid out in panels (its one-off cost then pays).
constexpr int64_t kMinPanelSteps = 4;

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

// Whether torch has oneDNN (ATen's mkldnn ops) and it is enabled.
bool have_onednn() { return at::hasMKLDNN() && at::globalContext().userEnabledMkldnn(); }

}  // namespace

struct CpuBackend {
  // Panels pay for their layout pass from about a hundred rows; fewer go to MKL as they are.
  template <typename S>
  static CpuDenseWeight<S> dense_weight(const at::Tensor& w, bool trans, const at::Tensor& bias, int64_t rows) {
    constexpr int64_t kMinPanelRows = 128;
    CpuDenseWeight<S> dw{w.contiguous(), bias.defined() ? bias.contiguous() : bias, trans};
    const int64_t k = w.size(trans ? 1 : 0), n = w.size(trans ? 0 : 1);
    if (has_kernels<S>() && k > 0 && n > 0 && rows >= kMinPanelRows) dw.panels = Panels<S>(ptr<S>(dw.w), trans, k, 1, n, Scratch::kInputWeight);
    return dw;
  }

  // g^T x and g's column sums in one oneDNN inner-product backward pass on its own plain
  // layout (two copies in, no transposes), else ATen.
  static std::pair<at::Tensor, at::Tensor> weight_grad(const at::Tensor& g, const at::Tensor& x, bool bias) {
    if (g.scalar_type() == at::kFloat && have_onednn() && g.size(0) * g.size(1) * x.size(1) >= kOnednnMinWork) {
      auto [grad_w, grad_b] = at::mkldnn_linear_backward_weights(g.contiguous().to_mkldnn(), x.contiguous().to_mkldnn(), at::empty({0}, g.options()), bias);
      return {grad_w, bias ? grad_b : at::Tensor()};
    }
    return {at::mm(g.t(), x), bias ? g.sum(0) : at::Tensor()};
  }

  // The scalar types the CPU kernels are built for (check_dtype turns the others away).
  template <typename S>
  static constexpr bool has_kernels() { return std::is_same_v<S, float> || std::is_same_v<S, double>; }

  static void check_dtype(at::ScalarType t) {
    TORCH_CHECK(t == at::kFloat || t == at::kDouble,
                "fused_rnn on CPU supports float32 and float64 tensors, got ", t);
  }

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

  // Per-step weights are laid out in panels once when used for a few steps; a single step
  // reads them in place.
  template <typename S>
  static CpuStepWeight<S> step_weight(const S* w, bool trans, int64_t k, int64_t n, int64_t /*max_rows*/,
                                      int64_t steps, Scratch slot) {
    CpuStepWeight<S> sw{w, trans, k, n};
    if (has_kernels<S>() && steps >= kMinPanelSteps && k > 0 && n > 0) sw.panels = Panels<S>(w, trans, k, 1, n, slot);
    return sw;
  }

  // W_hh [G*H, H_out] for the recurrent GEMM h_prev W_hh^T, its panels grouped by gate.
  template <class Cell, typename S>
  static CpuStepWeight<S> recurrent_weight(const S* w_hh, int64_t h_out, int64_t hidden, int64_t max_rows,
                                           int64_t steps) {
    CpuStepWeight<S> sw{w_hh, true, h_out, Cell::kGates * hidden};
    if (has_kernels<S>() && steps >= kMinPanelSteps && h_out > 0 && hidden > 0) {
      sw.panels = Panels<S>(w_hh, true, h_out, Cell::kGates, hidden, Scratch::kRecurrentWeight);
      sw.h_prev = cpu_scratch(Scratch::kStateCopy, {max_rows, h_out}, at::TensorOptions().dtype(c10::CppTypeToScalarType<S>::value));
    }
    return sw;
  }

  // gates += h_prev W_hh^T (beta 1; GRU: gates = h_prev W_hh^T, beta 0), then the cell's pointwise
  // step; with panels, each thread runs both for its own block of hidden units in one pass.
  template <class Cell, typename S>
  static void recurrent_step(const CpuStepWeight<S>& w_hh, const StepForward<S>& a, int64_t batch, S* gates,
                             int64_t ld_gates, S beta) {
    if constexpr (!has_kernels<S>()) {
      check_dtype(c10::CppTypeToScalarType<S>::value);
    } else {
      if (!w_hh.panels.defined()) {
        w_hh.gemm(batch, a.h_state, w_hh.k, beta, gates, ld_gates);
        return forward_step<Cell, S>(a, batch);
      }
      if (batch > 0) fused_step<Cell>(w_hh, a, batch, gates, ld_gates, beta);
    }
  }

  template <class Cell, typename S>
  static void fused_step(const CpuStepWeight<S>& w_hh, const StepForward<S>& a, int64_t batch, S* gates,
                         int64_t ld_gates, S beta) {
    // The pointwise step overwrites h_state (h_prev -> h_new) while other threads still read
    // it for their GEMM: they read this copy instead.
    S* h_prev = w_hh.h_prev.template data_ptr<S>();
    std::memcpy(h_prev, a.h_state, batch * w_hh.k * sizeof(S));
    const Panels<S>& panels = w_hh.panels;
    constexpr int64_t W = Panels<S>::kWidth;
    for_each_panel_block(panels, batch, [&](int64_t p, int64_t first, int64_t rows) {
      panels.block(p, rows, h_prev + first * w_hh.k, w_hh.k, beta, gates + first * ld_gates, ld_gates);
      for (int64_t v = 0; v < panels.unit_vectors(); ++v) {
        const int64_t j = panels.unit(p, v), lanes = panels.valid_lanes(p, v);
        for (int64_t b = first; b < first + rows; ++b) {
          if (lanes == W) Cell::template forward<at::vec::Vectorized<S>, VecIO<S>>(a, b, j);
          else
            for (int64_t l = 0; l < lanes; ++l) Cell::template forward<S, ScalarIO<S>>(a, b, j + l);
        }
      }
    });
  }

  static at::Tensor scratch(Scratch slot, at::IntArrayRef sizes, const at::TensorOptions& options) {
    return cpu_scratch(slot, sizes, options);
  }

  struct NoGuard {};
  static NoGuard guard(const c10::Device&) { return {}; }

  template <class Cell, typename S>
  static void forward_step(const StepForward<S>& a, int64_t batch) {
    if constexpr (has_kernels<S>()) {
      for_each_chunk<S>(batch, a.hidden, Cell::kGates, [&](int64_t b, int64_t j, bool vec) {
        if (vec) Cell::template forward<at::vec::Vectorized<S>, VecIO<S>>(a, b, j);
        else Cell::template forward<S, ScalarIO<S>>(a, b, j);
      });
    } else {
      check_dtype(c10::CppTypeToScalarType<S>::value);
    }
  }

  template <class Cell, typename S>
  static void backward_step(const StepBackward<S>& a, int64_t batch) {
    if constexpr (has_kernels<S>()) {
      for_each_chunk<S>(batch, a.hidden, Cell::kGates, [&](int64_t b, int64_t j, bool vec) {
        if (vec) Cell::template backward<at::vec::Vectorized<S>, VecIO<S>>(a, b, j);
        else Cell::template backward<S, ScalarIO<S>>(a, b, j);
      });
    } else {
      check_dtype(c10::CppTypeToScalarType<S>::value);
    }
  }
};

template <typename S>
void CpuDenseWeight<S>::apply_out(at::Tensor& out, const at::Tensor& x) const {
  const int64_t m = x.size(0);
  if (m == 0 || out.size(1) == 0) return;
  if (!panels.defined()) {
    const at::Tensor op_w = trans ? w.t() : w;
    if (bias.defined()) at::addmm_out(out, bias, x, op_w);
    else at::mm_out(out, x, op_w);
    return;
  }
  TORCH_INTERNAL_ASSERT(x.is_contiguous() && out.stride(1) == 1);
  panels.multiply(m, ptr<S>(x), panels.k(), S(0), ptr<S>(out), out.stride(0), ptr<S>(bias));
}

template <typename S>
void CpuStepWeight<S>::gemm(int64_t m, const S* a, int64_t lda, S beta, S* c, int64_t ldc) const {
  if (m == 0) return;
  if (!panels.defined()) return CpuBackend::gemm<S>(false, trans, m, n, k, S(1), a, lda, w, trans ? k : n, beta, c, ldc);
  panels.multiply(m, a, lda, beta, c, ldc);
}

TORCH_LIBRARY_IMPL(fused_rnn, CPU, m) { FUSED_RNN_REGISTER_BACKEND(m, CpuBackend); }

}  // namespace fused_rnn
