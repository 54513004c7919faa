// Gate math of every cell, written once and shared by the CPU backend (where V is
// at::vec::Vectorized<scalar_t>) and the CUDA kernels (where V is float or double).
//
// A cell's pointwise step works on one row b of the batch and one chunk of hidden
// columns starting at j. `IO` says how to move a chunk between memory and V:
//   IO::load(ptr)        -> V      IO::store(ptr, V)
// On the CPU a chunk is a SIMD vector (with a masked tail); on the GPU a single element.
// `Act<V>` supplies the activations for each value type.
//
// Reserve layouts (per row, H = hidden_size, gate order as torch.nn):
//   LSTM: [ i f g o | c | h_unprojected (proj_size > 0 only) ]   activations after the pass
//   GRU : [ r z n | W_hn h + b_hn ]
//   RNN : none (backward reads h from the output)
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FR_HD __host__ __device__ __forceinline__
#else
#define FR_HD inline __attribute__((always_inline))
#endif

namespace fused_rnn {

// Activations per value type; the CPU backend specialises this for at::vec::Vectorized.
template <typename V>
struct Act;

template <>
struct Act<float> {
  static FR_HD float sigmoid(float x) { return 1.0f / (1.0f + ::expf(-x)); }
  static FR_HD float tanh(float x) { return ::tanhf(x); }
  static FR_HD float relu(float x) { return x > 0.0f ? x : (x != x ? x : 0.0f); }
  // d relu(pre) given the output h = relu(pre): the gradient passes where h > 0.
  static FR_HD float relu_backward(float dh, float h) { return h > 0.0f ? dh : 0.0f; }
};

template <>
struct Act<double> {
  static FR_HD double sigmoid(double x) { return 1.0 / (1.0 + ::exp(-x)); }
  static FR_HD double tanh(double x) { return ::tanh(x); }
  static FR_HD double relu(double x) { return x > 0.0 ? x : (x != x ? x : 0.0); }
  static FR_HD double relu_backward(double dh, double h) { return h > 0.0 ? dh : 0.0; }
};

// Pointers for the rows [0, batch) of one time step, forward direction of time.
template <typename S>
struct StepForward {
  S* reserve;            // [batch, ld_reserve]: gate pre-activations in, saved values out
  int64_t ld_reserve;
  const S* hidden_gates; // GRU only: [batch, 3H] = W_hh h_prev (b_hr, b_hz are in the input projection)
  const S* bias_hn;      // GRU only: [H] b_hn
  S* h_state;            // [batch, H]: h_prev in, h_new out (not written when LSTM projects)
  S* c_state;            // LSTM only: [batch, H]: c_prev in, c_new out
  S* output;             // [batch, ld_output]: h_new (not written when LSTM projects)
  int64_t ld_output;
  void* output_rounded;  // null, or where the backend's steps write h_new rounded to the layer's
                         // storage type ([batch, ld_output]; layer.h, Backend::rounds_output)
  int64_t hidden;
  bool relu;             // RNN only
  bool project;          // LSTM only: h goes to the reserve; a GEMM then projects it
  bool save;             // keep the activations in the reserve for the backward pass (LSTM, GRU)
};

// Pointers for one time step of the backward pass.
template <typename S>
struct StepBackward {
  const S* reserve;      // saved values of this step, [batch, ld_reserve]
  int64_t ld_reserve;
  const S* output;       // h_new of this step, [batch, ld_output] (RNN uses it)
  int64_t ld_output;
  const S* grad_h;       // dL/dh_new from above, [batch, ld_grad_h]
  int64_t ld_grad_h;
  const S* grad_h_rec;   // dL/dh_new from the next step, [batch, H]; may be null
  const S* h_prev;       // GRU: [batch, ld_prev]
  const S* c_prev;       // LSTM: [batch, ld_prev]
  int64_t ld_prev;
  S* grad_c_state;       // LSTM: dL/dc_new in, dL/dc_prev out, [batch, H]
  S* grad_h_state;       // GRU: receives the direct part z * dh of dL/dh_prev, [batch, H]
  S* grad_gates;         // [batch, G*H] gradients of the gate pre-activations (input side)
  S* grad_hidden_gates;  // GRU: [batch, 3H] gradients of W_hh h_prev + b_hh
  int64_t hidden;
  bool relu;
};

struct LstmCell {
  static constexpr int kGates = 4;
  static constexpr bool kHasCell = true;
  static constexpr bool kSeparateHiddenGates = false;  // b_hh folds into the input projection
  static int64_t reserve_width(int64_t hidden, bool project) { return (project ? 6 : 5) * hidden; }

  template <typename V, typename IO, typename S>
  static FR_HD void forward(const StepForward<S>& a, int64_t b, int64_t j) {
    const int64_t H = a.hidden;
    S* r = a.reserve + b * a.ld_reserve + j;
    const V i = Act<V>::sigmoid(IO::load(r));
    const V f = Act<V>::sigmoid(IO::load(r + H));
    const V g = Act<V>::tanh(IO::load(r + 2 * H));
    const V o = Act<V>::sigmoid(IO::load(r + 3 * H));
    S* c_state = a.c_state + b * H + j;
    const V c = f * IO::load(c_state) + i * g;
    const V h = o * Act<V>::tanh(c);
    if (a.save) {
      IO::store(r, i);
      IO::store(r + H, f);
      IO::store(r + 2 * H, g);
      IO::store(r + 3 * H, o);
      IO::store(r + 4 * H, c);
    }
    IO::store(c_state, c);
    if (a.project) {
      IO::store(r + 5 * H, h);
    } else {
      IO::store(a.h_state + b * H + j, h);
      IO::store(a.output + b * a.ld_output + j, h);
    }
  }

  template <typename V, typename IO, typename S>
  static FR_HD void backward(const StepBackward<S>& a, int64_t b, int64_t j) {
    const int64_t H = a.hidden;
    const S* r = a.reserve + b * a.ld_reserve + j;
    const V i = IO::load(r), f = IO::load(r + H), g = IO::load(r + 2 * H), o = IO::load(r + 3 * H);
    const V tc = Act<V>::tanh(IO::load(r + 4 * H));
    V dh = IO::load(a.grad_h + b * a.ld_grad_h + j);
    if (a.grad_h_rec) dh = dh + IO::load(a.grad_h_rec + b * H + j);
    S* dc_state = a.grad_c_state + b * H + j;
    const V one(1);
    const V dc = IO::load(dc_state) + dh * o * (one - tc * tc);
    S* dg = a.grad_gates + b * 4 * H + j;
    IO::store(dg, dc * g * i * (one - i));
    IO::store(dg + H, dc * IO::load(a.c_prev + b * a.ld_prev + j) * f * (one - f));
    IO::store(dg + 2 * H, dc * i * (one - g * g));
    IO::store(dg + 3 * H, dh * tc * o * (one - o));
    IO::store(dc_state, dc * f);
  }
};

struct GruCell {
  static constexpr int kGates = 3;
  static constexpr bool kHasCell = false;
  static constexpr bool kSeparateHiddenGates = true;  // n = tanh(x_n + r * (W_hn h + b_hn))
  static int64_t reserve_width(int64_t hidden, bool) { return 4 * hidden; }

  template <typename V, typename IO, typename S>
  static FR_HD void forward(const StepForward<S>& a, int64_t b, int64_t j) {
    const int64_t H = a.hidden;
    S* r_ptr = a.reserve + b * a.ld_reserve + j;
    const S* hg = a.hidden_gates + b * 3 * H + j;
    const V hn = IO::load(hg + 2 * H) + IO::load(a.bias_hn + j);
    const V r = Act<V>::sigmoid(IO::load(r_ptr) + IO::load(hg));
    const V z = Act<V>::sigmoid(IO::load(r_ptr + H) + IO::load(hg + H));
    const V n = Act<V>::tanh(IO::load(r_ptr + 2 * H) + r * hn);
    S* h_state = a.h_state + b * H + j;
    const V h_prev = IO::load(h_state);
    const V h = n + z * (h_prev - n);  // (1 - z) * n + z * h_prev
    if (a.save) {
      IO::store(r_ptr, r);
      IO::store(r_ptr + H, z);
      IO::store(r_ptr + 2 * H, n);
      IO::store(r_ptr + 3 * H, hn);
    }
    IO::store(h_state, h);
    IO::store(a.output + b * a.ld_output + j, h);
  }

  template <typename V, typename IO, typename S>
  static FR_HD void backward(const StepBackward<S>& a, int64_t b, int64_t j) {
    const int64_t H = a.hidden;
    const S* r_ptr = a.reserve + b * a.ld_reserve + j;
    const V r = IO::load(r_ptr), z = IO::load(r_ptr + H), n = IO::load(r_ptr + 2 * H);
    const V hn = IO::load(r_ptr + 3 * H);
    V dh = IO::load(a.grad_h + b * a.ld_grad_h + j);
    if (a.grad_h_rec) dh = dh + IO::load(a.grad_h_rec + b * H + j);
    const V h_prev = IO::load(a.h_prev + b * a.ld_prev + j);
    const V one(1);
    const V dn = dh * (one - z) * (one - n * n);   // d pre-activation of n
    const V dr = dn * hn * r * (one - r);
    const V dz = dh * (h_prev - n) * z * (one - z);
    S* dgx = a.grad_gates + b * 3 * H + j;
    S* dgh = a.grad_hidden_gates + b * 3 * H + j;
    IO::store(dgx, dr);
    IO::store(dgx + H, dz);
    IO::store(dgx + 2 * H, dn);
    IO::store(dgh, dr);
    IO::store(dgh + H, dz);
    IO::store(dgh + 2 * H, dn * r);
    IO::store(a.grad_h_state + b * H + j, dh * z);
  }
};

struct RnnCell {
  static constexpr int kGates = 1;
  static constexpr bool kHasCell = false;
  static constexpr bool kSeparateHiddenGates = false;
  static int64_t reserve_width(int64_t, bool) { return 0; }

  template <typename V, typename IO, typename S>
  static FR_HD void forward(const StepForward<S>& a, int64_t b, int64_t j) {
    const V pre = IO::load(a.reserve + b * a.ld_reserve + j);
    const V h = a.relu ? Act<V>::relu(pre) : Act<V>::tanh(pre);
    IO::store(a.h_state + b * a.hidden + j, h);
    IO::store(a.output + b * a.ld_output + j, h);
  }

  template <typename V, typename IO, typename S>
  static FR_HD void backward(const StepBackward<S>& a, int64_t b, int64_t j) {
    V dh = IO::load(a.grad_h + b * a.ld_grad_h + j);
    if (a.grad_h_rec) dh = dh + IO::load(a.grad_h_rec + b * a.hidden + j);
    const V h = IO::load(a.output + b * a.ld_output + j);
    const V dpre = a.relu ? Act<V>::relu_backward(dh, h) : dh * (V(1) - h * h);
    IO::store(a.grad_gates + b * a.hidden + j, dpre);
  }
};

}  // namespace fused_rnn
