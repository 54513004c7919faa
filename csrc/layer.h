// One recurrent layer, one direction, whole sequence — the loop shared by every cell type
// and every backend. The Backend supplies the GEMMs (on CPU its own panel kernel or MKL; on
// CUDA cuBLAS) and the per-step pointwise pass:
//   Backend::check_dtype(ScalarType)
//   Backend::kHalfKernels: whether it has kernels for float16 and bfloat16 (CPU: no; a layer of
//       those storage types then computes in float32, see compute_type)
//   Backend::guard(Device) -> RAII object that makes the device current for the op
//   Backend::dense_weight<S>(w, trans, bias, rows, chunk_rows, operands) -> an object whose
//       .apply_out(out, x) computes out = x op(w) (+ bias), op(w) = w^T if trans: the large GEMMs
//       outside the time loop over `rows` rows in all (0: never applied), one chunk of at most
//       `chunk_rows` at a time (out may be a column range of a wider buffer; bias may be
//       undefined; w in S, or as recurrent_weight's w_ih). `operands` as for recurrent_weight
//   Backend::weight_grad_out<S>(grad_w, g, x, accumulate, operands): grad_w = g^T x, or += if
//       accumulate (a weight's gradient, a chunk of rows at a time); `operands` as for recurrent_weight;
//       on a backend whose compute type is wider than the storage type `operands`, x may be in
//       that type, and grad_w too (not accumulating: the sums rounded to it), else in S
//   Backend::scratch(Scratch role, sizes, options) -> a tensor for the duration of the op
//   Backend::empty(sizes, options) -> an uninitialised tensor that the op returns or saves
//   Backend::step_weight<S>(w, trans, k, n, max_rows, steps, role, operands) -> an object whose
//       .gemm(m, a, lda, beta, c, ldc) computes row-major C[m, n] = A[m, k] op(W) + beta C
//       for a weight W used at each of `steps` steps (a backend may re-layout it once per call),
//       and whose .row_groups says how many row groups the steps may be split into. w: a tensor
//       in S, or as recurrent_weight's w_hh; undefined where steps is 0. `operands` as for
//       recurrent_weight
//   Backend::recurrent_weight<Cell, S>(w_hh, h_out, hidden, max_rows, steps, w_ih, bias, operands)
//       -> the same for W_hh [gates*hidden, h_out] in h_prev W_hh^T (w_hh and w_ih tensors, in S or,
//       where Backend::kHalfKernels is false, in the layer's storage type, as dense_weight's w:
//       the backend converts what it reads in S). Where w_ih is given, the
//       backend may fold the input projection into it (its .folded_input > 0): each step's GEMM
//       then computes [h_prev, x_t] [W_hh, W_ih]^T + bias, and the input projection is skipped.
//       `operands`: for a layer computed in a wider type than its storage type, the storage
//       type, to which the backend may round the GEMM's operands (CPU: bfloat16 products on
//       AVX512-BF16, accumulated in float32); else undefined. And
//   Backend::for_each_row_group(const Steps&, t_lo, t_hi, groups, f): calls f(row_begin, row_end)
//       for at most `groups` groups of rows that together cover [0, batch), each running the
//       steps [t_lo, t_hi) on its rows. The recurrence never mixes rows, so the groups need no
//       synchronisation between steps and may run concurrently. `groups` is the recurrent step
//       weight's row_groups: how many it was laid out for (1: all rows at once, parallel inside
//       each step).
//   Backend::recurrent_step<Cell, S>(w_hh, const StepForward<S>&, row_begin, row_end, gates,
//       ld_gates, beta, x_t, x_t_stored, h_prev): for the step's rows [row_begin, row_end), gates =
//       h_state W_hh^T + beta gates (with the input folded in: [h_state, x_t] [W_hh, W_ih]^T +
//       bias), then the cell's pointwise step (fused or not). x_t's rows (stride I) are x_t in S,
//       or x_t_stored in the input's own type where Backend::reads_stored_input said so. h_prev, if
//       not null, holds the same values as h_state (rows of stride h_out) where the pointwise step
//       does not overwrite them
//   Backend::rounds_output(w_hh) -> whether the steps of a recurrent weight, in a layer computed in a
//       wider type than its storage type (`operands`), can write h_new rounded to the storage type
//       into StepForward::output_rounded themselves (the layer then sets it, and points
//       StepForward::output at h_state)
//   Backend::reads_stored_input(w_hh, x) -> whether the steps of a recurrent weight with the input
//       folded in may read the contiguous input x in its own type, which then is not converted to
//       S (CPU: bfloat16 products read a bfloat16 input as it is); and (w_ih, x), for a dense
//       weight's apply_out
//   Backend::backward_step<Cell, S>(w_hh, grad_gates_after, after_end, const StepBackward<S>&,
//       row_begin, row_end): where grad_gates_after is not null, first grad_h_state (+)=
//       grad_gates_after W_hh over rows [row_begin, after_end) (the step after's W_hh-side gate
//       gradients; += for GRU), then the cell's backward pointwise step over [row_begin, row_end)
//   Backend::copy<S>(dst, src, n) and Backend::add<S>(dst, a, b, n): dst = src and dst = a + b
//       over n values of the op's device memory (in order with the backend's other work)
//   Backend::kForwardChunkValues, kBackwardChunkValues: about how many gate values the reused
//       buffers of inference (unfolded input) and of the backward pass hold, a chunk of steps at a time
//   Backend::min_projection_chunk_rows<S>(w_ih, rows): the fewest rows an inference chunk of a
//       call of `rows` rows has
//   Backend::max_projection_chunk_rows(w_hh) -> the most rows a chunk's input projection takes, for
//       a layer whose recurrent weight is w_hh (as recurrent_weight made it)
//   Backend::gate_row_stride(width, element_size) -> the row stride, at least width, of a
//       forward gate buffer that is not the reserve (rows of `width` gates of element_size bytes)
//   Backend::kPersistentRecurrence: whether the backend can run a chunk's steps in one call
//       (CUDA's persistent kernels). If so, Backend::persistent_recurrence<Cell, S>(w_hh, hidden,
//       h_out, max_rows, backward) -> an object whose .forward(chunk) / .backward(chunk) run the
//       recurrence of a chunk (RecurrenceChunk) in place of the per-step calls below, and return
//       false, doing nothing, where it does not (unsupported type or shape, not chosen).
// The Step structs point at row 0 of a step; the row range says which rows to compute.
//
// Sequences are processed as rows: an unpacked [T, B, I] input is T steps of B rows; a
// packed [N, I] input is steps of batch_sizes[t] rows (sorted by decreasing length, as in
// PackedSequence). The running state lives in [B, ·] buffers of which step t touches
// only the first batch_sizes[t] rows, so padding is never computed and, when the loop
// ends, every row holds the state at its own last step (h_n, c_n).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <vector>

#include "cells.h"

namespace fused_rnn {

using at::Tensor;

// Fewest rows (steps x batch) in a chunk of steps whose GEMMs run outside the time loop: the input
// projection of a forward chunk, the input and weight gradients of a backward one.
constexpr int64_t kMinChunkRows = 256;

struct LayerWeights {
  Tensor w_ih, w_hh, b_ih, b_hh, w_hr;  // biases and w_hr may be undefined
};

// Row layout of a sequence: batch size and first row of each time step.
struct Steps {
  std::vector<int64_t> batch;
  std::vector<int64_t> offset;
  bool packed = false;
  int64_t rows = 0;

  int64_t count() const { return static_cast<int64_t>(batch.size()); }
};

inline Steps make_steps(const Tensor& input, const c10::optional<Tensor>& batch_sizes) {
  Steps s;
  if (batch_sizes.has_value()) {
    const Tensor& bs = *batch_sizes;
    TORCH_CHECK(bs.dim() == 1 && bs.scalar_type() == at::kLong && bs.device().is_cpu(),
                "fused_rnn: batch_sizes must be a 1-D int64 CPU tensor, got ", bs.dim(), "-D ",
                bs.scalar_type(), " on ", bs.device());
    TORCH_CHECK(input.dim() == 2, "fused_rnn: packed input must be 2-D [rows, features], got ",
                input.dim(), "-D");
    s.packed = true;
    const Tensor bsc = bs.contiguous();
    const int64_t* p = bsc.data_ptr<int64_t>();
    for (int64_t t = 0; t < bsc.numel(); ++t) {
      TORCH_CHECK(p[t] > 0 && (t == 0 || p[t] <= p[t - 1]),
                  "fused_rnn: batch_sizes must be positive and non-increasing, got ", bs);
      s.offset.push_back(s.rows);
      s.batch.push_back(p[t]);
      s.rows += p[t];
    }
    TORCH_CHECK(s.rows == input.size(0), "fused_rnn: batch_sizes sum to ", s.rows,
                " but the packed input has ", input.size(0), " rows");
  } else {
    TORCH_CHECK(input.dim() == 3, "fused_rnn: input must be 3-D [seq_len, batch, features], got ",
                input.dim(), "-D");
    const int64_t T = input.size(0), B = input.size(1);
    TORCH_CHECK(T > 0, "Expected sequence length to be larger than 0 in RNN");
    for (int64_t t = 0; t < T; ++t) {
      s.offset.push_back(t * B);
      s.batch.push_back(B);
    }
    s.rows = T * B;
  }
  return s;
}

inline int64_t max_batch(const Steps& s) { return s.count() ? s.batch[0] : 0; }

// For each row of the steps [t_lo, t_hi), the state it started from: the same row of the step
// before it in processing order, or the initial state for rows that begin there, in init's
// dtype. Unpacked, this is a view of `seq` (where it has that dtype) except in the chunk holding
// the first step; packed, it is gathered.
inline Tensor previous_states(const Tensor& seq, const Tensor& init, const Steps& s, bool reverse, int64_t t_lo,
                              int64_t t_hi) {
  const int64_t T = s.count(), B = max_batch(s);
  const int64_t row_lo = s.offset[t_lo], row_hi = t_hi < T ? s.offset[t_hi] : s.rows, n = row_hi - row_lo;
  const auto in_init_type = [&](const Tensor& t) { return t.to(init.scalar_type()); };
  if (!s.packed) {
    const int64_t from = reverse ? row_lo + B : row_lo - B;  // first row of the step before
    if (reverse ? t_hi < T : t_lo > 0) return in_init_type(seq.narrow(0, from, n));
    if (n == B) return init;
    return reverse ? at::cat({in_init_type(seq.narrow(0, from, n - B)), init})
                   : at::cat({init, in_init_type(seq.narrow(0, row_lo, n - B))});
  }
  Tensor prev = at::empty({n, seq.size(1)}, init.options());
  for (int64_t t = t_lo; t < t_hi; ++t) {
    const int64_t bs = s.batch[t], row = s.offset[t] - row_lo;
    const int64_t before = reverse ? t + 1 : t - 1;
    const int64_t carried = (before >= 0 && before < T) ? std::min(bs, s.batch[before]) : 0;
    if (carried) prev.narrow(0, row, carried).copy_(seq.narrow(0, s.offset[before], carried));
    if (carried < bs) prev.narrow(0, row + carried, bs - carried).copy_(init.narrow(0, carried, bs - carried));
  }
  return prev;
}

// Unpacked, rows [row_lo, row_hi) of the steps [t_lo, t_hi) of `seq`, converted to `type`, with the B
// rows of the step before the first in processing order next to them (before them, or after them
// where time runs backwards): each row's previous state is then the same row one step away in the
// same copy (see previous_states), and only B more rows are converted. Where that step would come
// before the sequence, those rows hold `init` in columns [init_col, init_col + init.size(1)) (their
// other columns are left unset). Rows [lead, lead + n) are the chunk's, rows [B - lead, B - lead + n)
// their previous states, lead = B unless reverse.
template <class Backend>
Tensor rows_with_previous(const Tensor& seq, const Tensor& init, int64_t init_col, const Steps& s, bool reverse,
                          int64_t t_lo, int64_t t_hi, at::ScalarType type) {
  const int64_t T = s.count(), B = max_batch(s);
  const int64_t row_lo = s.offset[t_lo], row_hi = t_hi < T ? s.offset[t_hi] : s.rows, n = row_hi - row_lo;
  Tensor rows = Backend::empty({n + B, seq.size(1)}, seq.options().dtype(type));
  rows.narrow(0, reverse ? 0 : B, n).copy_(seq.narrow(0, row_lo, n));
  Tensor before = rows.narrow(0, reverse ? n : 0, B);
  if (reverse ? t_hi < T : t_lo > 0) before.copy_(seq.narrow(0, reverse ? row_hi : row_lo - B, B));
  else before.narrow(1, init_col, init.size(1)).copy_(init);
  return rows;
}

// Buffers an op needs only while it runs, by role; a backend may keep them from call to call
// (Backend::scratch), so each role is used once at a time.
enum class Scratch {
  kInputWeight, kRecurrentWeight, kProjectionWeight, kGradientPanels, kGradientOperands, kStateCopy, kInputCopy, kGemmOperands, kGates,
  kHiddenGates, kPanelOnUse, kGradientSlab, kCount
};

// t.narrow(dim, start, length), or t itself where that is all of it: each view op is a dispatcher
// round trip, which small calls feel.
inline Tensor part(const Tensor& t, int64_t dim, int64_t start, int64_t length) {
  return start == 0 && length == t.size(dim) ? t : t.narrow(dim, start, length);
}

template <typename S>
S* ptr(const Tensor& t) { return t.defined() ? static_cast<S*>(t.data_ptr()) : nullptr; }

// beta of the backward's recurrent GEMM into grad_h_state: GRU adds dgates W_hh to the direct part
// z * dh its pointwise step left there; the other cells' GEMM writes dL/dh_prev afresh.
template <class Cell, typename S>
S grad_h_prev_beta() { return S(Cell::kSeparateHiddenGates ? 1 : 0); }

// dL/dh_prev = dgates W_hh over rows [row_begin, row_end) of one step: `grad_gates` (the step's
// W_hh-side gate gradients, at its row 0) times W_hh into grad_h_state. `w_hh` is the backward's
// step weight of W_hh, k = gates * hidden and n = h_out.
template <class Cell, class StepWeight, typename S>
void grad_h_prev_from_gates(const StepWeight& w_hh, const S* grad_gates, S* grad_h_state, int64_t row_begin,
                            int64_t row_end) {
  w_hh.gemm(row_end - row_begin, grad_gates + row_begin * w_hh.k, w_hh.k, grad_h_prev_beta<Cell, S>(),
            grad_h_state + row_begin * w_hh.n, w_hh.n);
}

// The steps k in [first, last) of a chunk, for a backend that runs them in one call: step k is time
// step T - 1 - k where the processing runs time backwards (a reversed layer's forward, a forward
// layer's backward), else k. `step` points at the chunk's first row (row_lo) as a step's pointers
// point at its own row 0.
template <class Step>
struct RecurrenceChunk {
  Step step;
  const Steps& steps;
  bool time_backwards;
  int64_t first, last, row_lo;
  bool last_product;  // backward: whether dL/dh_prev of the chunk's last step is wanted
};

template <class Backend, class Cell, typename S>
auto persistent_recurrence(const Tensor& w_hh, int64_t hidden, int64_t h_out, int64_t max_rows, bool backward) {
  if constexpr (Backend::kPersistentRecurrence)
    return Backend::template persistent_recurrence<Cell, S>(w_hh, hidden, h_out, max_rows, backward);
  else
    return nullptr;  // never called: see the uses
}

// Calls f(S()) for the scalar type S of `type`, among those the backend has kernels for.
template <class Backend, class F>
void dispatch_kernel_type(at::ScalarType type, const F& f) {
  if constexpr (Backend::kHalfKernels)
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, type, "fused_rnn", [&] { f(scalar_t()); });
  else
    AT_DISPATCH_FLOATING_TYPES(type, "fused_rnn", [&] { f(scalar_t()); });
}

// The type a layer of storage type `t` computes in: float32 for float16 and bfloat16 where the
// backend has no kernels for them (the op converts on the way in and rounds its results).
template <class Backend>
at::ScalarType compute_type(at::ScalarType t) {
  return !Backend::kHalfKernels && (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

// A copy in another scalar type (t itself where it already has it), in memory from
// Backend::empty: on CPU the float32 copies of a half-precision layer then reuse the blocks that
// earlier ones (the forward's) gave back.
template <class Backend>
Tensor to_type(const Tensor& t, at::ScalarType type) {
  if (!t.defined() || t.scalar_type() == type) return t;
  Tensor copy = Backend::empty(t.sizes(), t.options().dtype(type));
  copy.copy_(t);
  return copy;
}

// w in `type`, except W_ih and W_hh, left as stored: the backend converts what it reads in
// `type` and lays bfloat16 panels out from them as they are (Backend::recurrent_weight).
template <class Backend>
LayerWeights to_type_except_gate_weights(const LayerWeights& w, at::ScalarType type) {
  return {w.w_ih, w.w_hh, to_type<Backend>(w.b_ih, type), to_type<Backend>(w.b_hh, type),
          to_type<Backend>(w.w_hr, type)};
}

template <class Backend>
std::vector<Tensor> to_type(std::vector<Tensor> ts, at::ScalarType type) {
  for (Tensor& t : ts) t = to_type<Backend>(t, type);
  return ts;
}

// The bias the input projection adds: b_ih + b_hh, except for GRU's b_hn (b_hh's last H), which
// the pointwise pass adds inside r * (W_hn h + b_hn). Undefined without biases. The weights'
// tensors are contiguous.
template <class Cell, class Backend, typename S>
Tensor fold_biases(const LayerWeights& w, int64_t H, const at::TensorOptions& opts) {
  const int64_t n = Cell::kGates * H, from_hh = Cell::kSeparateHiddenGates ? n - H : n;
  if (!w.b_hh.defined()) return w.b_ih;
  if (!w.b_ih.defined())
    return from_hh == n ? w.b_hh : at::cat({w.b_hh.narrow(0, 0, from_hh), at::zeros({n - from_hh}, opts)});
  Tensor bias = Backend::empty({n}, opts);
  Backend::template add<S>(ptr<S>(bias), ptr<S>(w.b_ih), ptr<S>(w.b_hh), from_hh);
  if (from_hh < n) Backend::template copy<S>(ptr<S>(bias) + from_hh, ptr<S>(w.b_ih) + from_hh, n - from_hh);
  return bias;
}

// layer_forward with every tensor in the type the layer computes in, except perhaps `input_`, W_ih
// and W_hh (in the storage type `operands`, else undefined; the backend may round the forward
// GEMMs' operands to it, see Backend::recurrent_weight).
template <class Cell, class Backend>
std::vector<Tensor> layer_forward_in_compute_type(const Tensor& input_, const c10::optional<Tensor>& batch_sizes,
                                                  const Tensor& hx, const Tensor& cx, const LayerWeights& w,
                                                  bool reverse, bool relu, bool save_reserve,
                                                  at::ScalarType operands) {
  const at::ScalarType compute = hx.scalar_type();
  Backend::check_dtype(compute);
  const auto device_guard = Backend::guard(input_.device());
  const Steps s = make_steps(input_, batch_sizes);
  const int64_t T = s.count(), I = w.w_ih.size(1), G = Cell::kGates, H = w.w_ih.size(0) / G;
  const int64_t H_out = w.w_hh.size(1);
  const bool project = w.w_hr.defined();
  const int64_t B = hx.size(0);
  const Tensor x = input_.reshape({s.rows, I}).contiguous();
  const auto opts = hx.options();

  // RNN keeps no reserve: its backward reads only h. A step's gate row holds its G*H gates, and
  // what the pointwise step saves for the backward (and a projected LSTM's h) after them.
  const int64_t R = Cell::reserve_width(H, project);
  const bool keep = save_reserve && R > 0;
  const int64_t width = keep || project ? std::max<int64_t>(R, G * H) : G * H;
  Tensor reserve;

  const Tensor h_init = hx.contiguous();
  Tensor h_state = Backend::empty(h_init.sizes(), opts);
  Tensor c_state = Cell::kHasCell ? Backend::empty(cx.sizes(), opts) : Tensor();
  // A storage type's output is computed a chunk of steps at a time (below) and rounded, or rounded
  // by the steps (Backend::rounds_output).
  const bool round_output = operands != at::ScalarType::Undefined;
  Tensor output = Backend::empty({s.rows, H_out}, round_output ? opts.dtype(operands) : opts);
  Tensor hidden_gates = Cell::kSeparateHiddenGates ? Backend::scratch(Scratch::kHiddenGates, {B, G * H}, opts) : Tensor();

  dispatch_kernel_type<Backend>(compute, [&](auto zero) {
    using S = decltype(zero);
    StepForward<S> a{};
    a.ld_output = H_out;
    a.hidden = H;
    a.relu = relu;
    a.project = project;
    a.save = save_reserve;
    a.h_state = ptr<S>(h_state);
    a.c_state = ptr<S>(c_state);
    Backend::template copy<S>(a.h_state, ptr<S>(h_init), h_init.numel());
    if (Cell::kHasCell) Backend::template copy<S>(a.c_state, ptr<S>(cx.contiguous()), cx.numel());
    a.hidden_gates = ptr<S>(hidden_gates);
    const Tensor bias = fold_biases<Cell, Backend, S>(w, H, opts);
    // GRU's b_hn, which sits inside r * (W_hn h + b_hn), is added by the pointwise pass.
    const Tensor no_bias_hn = Cell::kSeparateHiddenGates && !w.b_hh.defined() ? at::zeros({H}, opts) : Tensor();
    a.bias_hn = Cell::kSeparateHiddenGates ? (w.b_hh.defined() ? ptr<S>(w.b_hh) + 2 * H : ptr<S>(no_bias_hn)) : nullptr;
    // GRU's hidden gates need W_hh h alone, and a projected LSTM's step input is not its output.
    const bool may_fold = !Cell::kSeparateHiddenGates && !project;
    const auto w_hh_t = Backend::template recurrent_weight<Cell, S>(w.w_hh, H_out, H, B, T,
                                                                    may_fold ? w.w_ih : Tensor(), bias, operands);
    const bool folded = w_hh_t.folded_input > 0;
    // The gate buffer: the reserve itself when it is kept in the compute type (its rows start as
    // the gate pre-activations and end as what backward reads). Else, with the input folded in
    // and no reserve, a step's gates come from its own GEMM alone: every step reuses the same
    // rows, which stay in cache. Else a reused buffer takes the projected input of a chunk of
    // steps at a time, about Backend::kForwardChunkValues gate values and at least
    // Backend::min_projection_chunk_rows, as each chunk's projection reads all of W_ih (from memory
    // where it outgrows the caches: LSTM I=H=2048 B=16, 64 MiB of W_ih, would read it for every
    // 2 steps); a reserve in the storage type gets each chunk's saved values, rounded, after the
    // chunk. An input in the storage type is converted a chunk at a time, as the output is rounded;
    // with gates that need no chunks, the chunks hold about kForwardChunkValues output values (the
    // rounding of a whole sequence's float32 output, a copy as large as the output, took 3% of a
    // bfloat16 LSTM's inference at B=64 I=H=256); else, where the gates need none either, one chunk
    // keeps the threads on their own rows for the whole sequence.
    // Where the steps round h_new into the output themselves (Backend::rounds_output), it has no
    // chunks to round, and the pointwise step's h_new goes to h_state alone. An input the steps
    // read (folded in) and cannot read as stored still goes a chunk at a time.
    const bool steps_round_output = round_output && !project && Backend::rounds_output(w_hh_t);
    const bool round_chunks = round_output && !steps_round_output;
    const bool steps_read_stored = folded && Backend::reads_stored_input(w_hh_t, x);
    const bool steps_convert_input = folded && !steps_read_stored && x.scalar_type() != compute;
    const bool round_reserve = keep && operands != at::ScalarType::Undefined;
    const bool gates_in_reserve = keep && !round_reserve, reuse_rows = folded && !keep;
    const bool gates_unchunked = gates_in_reserve || reuse_rows;
    // A layer stored in a narrower type takes at most the steps whose gates in S fill as much memory
    // as all the steps' would in the storage type, which is what torch.nn's half-precision layers
    // hold (GRU B=16 I=H=64 T=100 bfloat16 inference: one chunk of 85 steps peaked at 1.25 MiB,
    // torch.nn at 1.04; two of 50 at 0.84).
    const int64_t narrow_steps =
        operands == at::ScalarType::Undefined
            ? T
            : std::max<int64_t>(1, (T * static_cast<int64_t>(c10::elementSize(operands)) + sizeof(S) - 1) /
                                       static_cast<int64_t>(sizeof(S)));
    const int64_t projection_steps =
        gates_unchunked ? T : std::max<int64_t>(1, Backend::max_projection_chunk_rows(w_hh_t) / std::max<int64_t>(1, B));
    const int64_t chunk =
        gates_unchunked && !round_chunks && !steps_convert_input
            ? std::max<int64_t>(T, 1)
            : std::max<int64_t>(std::min({Backend::kForwardChunkValues /
                                              std::max<int64_t>(1, B * (gates_unchunked ? H_out : width)),
                                          narrow_steps, projection_steps}),
                                (Backend::template min_projection_chunk_rows<S>(w.w_ih, s.rows) + B - 1) /
                                    std::max<int64_t>(1, B));
    const Tensor chunk_output = round_chunks ? Backend::empty({std::min(s.rows, chunk * B), H_out}, opts) : output;
    if (keep) reserve = Backend::empty({s.rows, R}, round_reserve ? opts.dtype(operands) : opts);
    // (A reused gate buffer's rows may be further apart than width: Backend::gate_row_stride.)
    const int64_t ld_gates = gates_in_reserve ? width : Backend::gate_row_stride(width, sizeof(S));
    const Tensor gates = gates_in_reserve ? reserve
                                          : Backend::scratch(Scratch::kGates,
                                                             {reuse_rows ? B : std::min(s.rows, chunk * B), ld_gates},
                                                             opts);
    a.ld_reserve = ld_gates;
    const auto w_ih_t = Backend::template dense_weight<S>(w.w_ih, true, bias, folded ? 0 : s.rows,
                                                          std::min(s.rows, chunk * B), operands);
    // Whatever reads x (the steps where the input is folded in, else the input projection) may
    // read it as stored: then no chunk of it is converted to S.
    const bool x_stored = folded ? steps_read_stored : Backend::reads_stored_input(w_ih_t, x);
    const auto w_hr_t = Backend::template step_weight<S>(w.w_hr, true, H, H_out, B, project ? T : 0,
                                                         Scratch::kProjectionWeight, at::ScalarType::Undefined);
    [[maybe_unused]] const auto persistent = persistent_recurrence<Backend, Cell, S>(w.w_hh, H, H_out, B, false);
    for (int64_t first = 0; first < T; first += chunk) {
      // This chunk's time steps [t_lo, t_hi) and rows [row_lo, row_hi), in processing order.
      const int64_t last = std::min(T, first + chunk);
      const int64_t t_lo = reverse ? T - last : first, t_hi = reverse ? T - first : last;
      const int64_t row_lo = s.offset[t_lo], row_hi = t_hi < T ? s.offset[t_hi] : s.rows;
      const int64_t gates_lo = gates_in_reserve ? row_lo : 0;  // gate buffer row of row_lo
      const int64_t output_lo = round_chunks ? row_lo : 0;      // chunk_output's first row
      const Tensor x_chunk = part(x, 0, row_lo, row_hi - row_lo);
      const Tensor x_rows = x_stored ? x_chunk : to_type<Backend>(x_chunk, compute);
      if (!folded) {
        Tensor chunk_gates = part(part(gates, 0, gates_lo, row_hi - row_lo), 1, 0, G * H);
        w_ih_t.apply_out(chunk_gates, x_rows);
      }
      bool ran = false;
      if constexpr (Backend::kPersistentRecurrence) {
        StepForward<S> step = a;
        step.reserve = ptr<S>(gates) + gates_lo * ld_gates;
        step.output = ptr<S>(chunk_output) + (row_lo - output_lo) * H_out;
        ran = persistent.forward(RecurrenceChunk<StepForward<S>>{step, s, reverse, first, last, row_lo, false},
                                 ptr<S>(hidden_gates));
      }
      if (!ran) Backend::for_each_row_group(s, t_lo, t_hi, w_hh_t.row_groups, [&](int64_t row_begin, int64_t row_end) {
        StepForward<S> step = a;
        for (int64_t k = first; k < last; ++k) {
          const int64_t t = reverse ? T - 1 - k : k;
          const int64_t end = std::min(s.batch[t], row_end), row = s.offset[t];
          if (end <= row_begin) continue;
          step.reserve = ptr<S>(gates) + (reuse_rows ? 0 : (row - row_lo + gates_lo) * ld_gates);
          if (steps_round_output) {
            step.output = step.h_state;
            step.output_rounded = static_cast<char*>(output.data_ptr()) + row * H_out * output.element_size();
          } else {
            step.output = ptr<S>(chunk_output) + (row - output_lo) * H_out;
          }
          // h_prev in place for the GEMM: hx at the first step, else the previous step's output
          // rows; none (h_state is read) where some rows start from hx mid-sequence (packed, time
          // reversed) or the previous step's output has been rounded (with its chunk, or by the step).
          const int64_t before = reverse ? t + 1 : t - 1;
          const S* h_prev = k == 0 ? ptr<S>(h_init)
                            : s.batch[before] >= end && !steps_round_output && !(round_chunks && k == first)
                                ? ptr<S>(chunk_output) + (s.offset[before] - output_lo) * H_out
                                : nullptr;
          // Recurrent GEMM, h_prev W_hh^T, straight into the gate rows (or GRU's hidden gates),
          // then the pointwise step.
          if (Cell::kSeparateHiddenGates)
            Backend::template recurrent_step<Cell, S>(w_hh_t, step, row_begin, end, ptr<S>(hidden_gates), G * H, S(0),
                                                      nullptr, nullptr, h_prev);
          else
            Backend::template recurrent_step<Cell, S>(
                w_hh_t, step, row_begin, end, step.reserve, ld_gates, S(folded ? 0 : 1),
                folded && !x_stored ? ptr<S>(x_rows) + (row - row_lo) * I : nullptr,
                folded && x_stored
                    ? static_cast<const char*>(x_rows.data_ptr()) + (row - row_lo) * I * x_rows.element_size()
                    : nullptr,
                h_prev);
          if (project) {
            S* out_rows = step.output + row_begin * H_out;
            w_hr_t.gemm(end - row_begin, step.reserve + row_begin * ld_gates + 5 * H, ld_gates, S(0), out_rows, H_out);
            Backend::template copy<S>(step.h_state + row_begin * H_out, out_rows, (end - row_begin) * H_out);
          }
        }
      });
      if (round_reserve)
        part(reserve, 0, row_lo, row_hi - row_lo).copy_(part(part(gates, 0, 0, row_hi - row_lo), 1, 0, R));
      if (round_chunks) part(output, 0, row_lo, row_hi - row_lo).copy_(part(chunk_output, 0, 0, row_hi - row_lo));
    }
  });

  if (!s.packed) output = output.view({T, B, H_out});
  if (!keep) reserve = at::empty({0, R}, opts);
  return {output, h_state, c_state, reserve};
}

// Returns {output, h_n, c_n (LSTM only, else undefined), reserve}. Without `save_reserve`
// (inference), and for cells whose backward reads none (RNN), the reserve comes back with 0 rows:
// the gates are then computed a chunk of time steps at a time into a small reused buffer.
template <class Cell, class Backend>
std::vector<Tensor> layer_forward(const Tensor& input, const c10::optional<Tensor>& batch_sizes, const Tensor& hx,
                                  const Tensor& cx, const LayerWeights& w, bool reverse, bool relu,
                                  bool save_reserve) {
  const at::ScalarType storage = input.scalar_type(), compute = compute_type<Backend>(storage);
  if (compute == storage)
    return layer_forward_in_compute_type<Cell, Backend>(input, batch_sizes, hx, cx, w, reverse, relu, save_reserve,
                                                        at::ScalarType::Undefined);
  // A storage type computed in a wider one: the state is carried between steps unrounded, and
  // the results are rounded to the storage type. The input, the output and in training the
  // reserve, the largest tensors, are converted a chunk of steps at a time (below); the rest whole.
  const auto up = [&](const Tensor& t) { return to_type<Backend>(t, compute); };
  const LayerWeights weights = to_type_except_gate_weights<Backend>(w, compute);
  return to_type<Backend>(layer_forward_in_compute_type<Cell, Backend>(input, batch_sizes, up(hx), up(cx), weights,
                                                                       reverse, relu, save_reserve, storage),
                          storage);
}

// layer_backward with every tensor in the type the layer computes in, except perhaps `input`,
// `grad_output`, `output`, `reserve`, W_ih and W_hh (their storage type `operands`, else
// undefined: see Backend::recurrent_weight).
template <class Cell, class Backend>
std::vector<Tensor> layer_backward_in_compute_type(const Tensor& grad_output, const Tensor& grad_hy,
                                                   const Tensor& grad_cy, const Tensor& input,
                                                   const c10::optional<Tensor>& batch_sizes, const Tensor& hx,
                                                   const Tensor& cx, const LayerWeights& w, const Tensor& output,
                                                   const Tensor& reserve, bool has_bias, bool reverse, bool relu,
                                                   bool input_grad, bool weight_grads, bool hx_grad,
                                                   at::ScalarType operands) {
  const at::ScalarType compute = hx.scalar_type();
  Backend::check_dtype(compute);
  const auto device_guard = Backend::guard(input.device());
  const Steps s = make_steps(input, batch_sizes);
  const int64_t I = w.w_ih.size(1), G = Cell::kGates, H = w.w_ih.size(0) / G;
  const int64_t H_out = w.w_hh.size(1);
  const bool project = w.w_hr.defined();
  const int64_t B = hx.size(0), R = reserve.size(1);
  const Tensor x = input.reshape({s.rows, I}).contiguous();
  const auto opts = hx.options();
  const Tensor out = output.reshape({s.rows, H_out}).contiguous();
  // dL/d output read in place where its rows are evenly spaced with unit column stride (as a
  // direction's half of a bidirectional layer's gradient is); the projection's sums need it dense.
  Tensor grad_out = grad_output.reshape({s.rows, H_out});
  if (project || (grad_out.stride(1) != 1 && H_out > 1) || grad_out.stride(0) < H_out) grad_out = grad_out.contiguous();
  // Rows [row, row + n) of x, grad_out, out or the reserve, in the compute type (in place where
  // they have it).
  const auto rows_in_compute_type = [&](const Tensor& t, int64_t row, int64_t n) {
    return to_type<Backend>(part(t, 0, row, n), compute);
  };
  const Tensor res = reserve.contiguous();
  const auto reserve_rows = [&](int64_t row, int64_t n) { return R > 0 ? rows_in_compute_type(res, row, n) : res; };  // RNN: none

  const Tensor h_init = hx.contiguous(), c_init = Cell::kHasCell ? cx.contiguous() : Tensor();
  Tensor grad_h_state = Backend::empty(grad_hy.sizes(), opts);
  Tensor grad_c_state = Cell::kHasCell ? Backend::empty(grad_cy.sizes(), opts) : Tensor();
  Tensor grad_projected = project ? Backend::empty({s.rows, H_out}, opts) : Tensor();  // dL/dh before W_hr
  Tensor grad_unprojected = project ? at::empty({B, H}, opts) : Tensor();

  // The steps run backwards a chunk at a time: the gate gradients of a chunk (about
  // Backend::kBackwardChunkValues values, and at least kMinChunkRows rows so that the GEMMs stay efficient)
  // go into a reused buffer, from which the input gradient and the weight and bias gradients are
  // taken by large GEMMs before the next chunk, so no [rows, G*H] buffer is needed. A layer stored in
  // a narrower type also converts each chunk's rows of the output (with h_prev), dL/d output, the
  // reserve and x to S, and computes its input gradient there: its chunk holds at most the steps
  // whose such copies and gate gradients fill half of what the whole sequence's output, dL/d output,
  // reserve, x and dL/dx take in the storage type (bfloat16 training, I=H=64 T=100: RNN B=16 had one
  // chunk of all the steps, peaking at 3.4 MiB against torch.nn's 1.1, now five of 20 at 0.9; LSTM
  // B=16 chunks of 32 steps, 5.2 MiB against 4.2, now 17 at 3.6-4.3).
  const int64_t T = s.count();
  const bool narrow_storage = operands != at::ScalarType::Undefined;
  constexpr int64_t kMaxParts = 4;
  int64_t chunk = Backend::kBackwardChunkValues / std::max<int64_t>(1, B * G * H), copy_steps = T;
  if (narrow_storage) {
    const int64_t stored = 2 * H_out + R + 2 * I, copies = G * H * (Cell::kSeparateHiddenGates ? 2 : 1) + stored;
    const int64_t stored_bytes = T * stored * static_cast<int64_t>(c10::elementSize(operands));
    copy_steps = std::max<int64_t>(1, stored_bytes / (2 * copies * static_cast<int64_t>(c10::elementSize(compute))));
    chunk = std::min(chunk, copy_steps);
  }
  chunk = std::max(chunk, (kMinChunkRows + B - 1) / std::max<int64_t>(1, B));
  const int64_t chunk_rows = std::min(s.rows, chunk * B);
  Tensor grad_gates = Backend::scratch(Scratch::kGates, {chunk_rows, G * H}, opts);
  Tensor grad_hidden_gates = Cell::kSeparateHiddenGates ? Backend::scratch(Scratch::kHiddenGates, {chunk_rows, G * H}, opts) : grad_gates;
  // In the input's shape, and returned as it is: autograd adds another gradient of the input (the
  // other direction's) into it in place, which it does not into a view. Without input_grad, empty.
  const Tensor grad_input = input_grad ? Backend::empty(input.sizes(), input.options()) : at::empty({0}, opts);
  const Tensor grad_input_by_row = input_grad ? grad_input.view({s.rows, I}) : Tensor();
  // Each chunk adds its share to the weight and bias gradients (the first one writes them).
  const auto empty = [&] { return at::empty({0}, opts); };
  // Without weight_grads, the weights' and biases' are left out, and with them two GEMMs as large
  // as the input gradient's.
  const bool bias_grads = weight_grads && has_bias;
  // A layer stored in a narrower type whose steps all go in one chunk has W_ih's and W_hh's
  // gradients written in that type as their single GEMMs finish them (Backend::weight_grad_out),
  // instead of in S and rounded after: no S copy of the weights' size (bfloat16 GRU I=H=512 at batch
  // 1, T=100: 6 MiB of float32, where torch.nn's whole training call peaks at 6.5-6.8 MiB).
  const auto weight_grad_opts = narrow_storage && chunk >= T ? opts.dtype(operands) : opts;
  Tensor grad_w_ih = weight_grads ? Backend::empty(w.w_ih.sizes(), weight_grad_opts) : empty();
  Tensor grad_w_hh = weight_grads ? Backend::empty(w.w_hh.sizes(), weight_grad_opts) : empty();
  Tensor grad_b_ih = bias_grads ? Backend::empty({G * H}, opts) : empty();
  Tensor grad_b_hh = bias_grads ? Backend::empty({G * H}, opts) : empty();
  Tensor grad_w_hr = project && weight_grads ? Backend::empty(w.w_hr.sizes(), opts) : empty();

  dispatch_kernel_type<Backend>(compute, [&](auto zero) {
    using S = decltype(zero);
    StepBackward<S> a{};
    a.ld_reserve = R;
    a.ld_output = H_out;
    a.hidden = H;
    a.relu = relu;
    a.grad_c_state = ptr<S>(grad_c_state);
    a.grad_h_state = ptr<S>(grad_h_state);
    Backend::template copy<S>(a.grad_h_state, ptr<S>(grad_hy.contiguous()), grad_hy.numel());
    if (Cell::kHasCell) Backend::template copy<S>(a.grad_c_state, ptr<S>(grad_cy.contiguous()), grad_cy.numel());
    // The GEMMs through W_ih and W_hh, and those of their gradients, may round their operands
    // (the gate gradients, x_t, h_prev) to `operands`.
    const auto w_ih_step =
        Backend::template dense_weight<S>(w.w_ih, false, Tensor(), input_grad ? s.rows : 0, chunk_rows, operands);
    // dL/dh_prev = dgates W_hh at every step but the sequence's first, and there only with hx_grad:
    // a single step without it needs no W_hh at all, so nothing is prepared for it. (Longer calls
    // prepare W_hh as for T steps either way, so that leaving dL/dhx out changes no other gradient.)
    const int64_t w_hh_products = hx_grad || T > 1 ? T : 0;
    const auto w_hh_step = Backend::template step_weight<S>(w.w_hh, false, G * H, H_out, B, w_hh_products,
                                                            Scratch::kRecurrentWeight, operands);
    const auto w_hr_step = Backend::template step_weight<S>(w.w_hr, false, H_out, H, B, project ? T : 0,
                                                            Scratch::kProjectionWeight, at::ScalarType::Undefined);
    [[maybe_unused]] const auto persistent = persistent_recurrence<Backend, Cell, S>(w.w_hh, H, H_out, B, true);
    for (int64_t first = 0; first < T; first += chunk) {
      // This chunk's time steps, in backward order, and the rows [row_lo, row_hi) they cover.
      const int64_t last = std::min(T, first + chunk);
      const int64_t t_lo = reverse ? first : T - last, t_hi = reverse ? last : T - first;
      const int64_t row_lo = s.offset[t_lo], row_hi = t_hi < T ? s.offset[t_hi] : s.rows, n_rows = row_hi - row_lo;
      // The chunk's rows in the compute type, and the states each started from: GRU's pointwise step
      // needs h_prev, LSTM's c_prev, and W_hh's gradient h_prev. A layer stored in a narrower type,
      // unpacked, converts those with the rows (rows_with_previous).
      Tensor h_prev, out_rows, c_prev, res_rows;
      const int64_t lead = reverse ? 0 : B;
      if (narrow_storage && !s.packed) {
        const Tensor outs = rows_with_previous<Backend>(out, h_init, 0, s, reverse, t_lo, t_hi, compute);
        out_rows = outs.narrow(0, lead, n_rows);
        h_prev = outs.narrow(0, B - lead, n_rows);
        if (Cell::kHasCell) {
          const Tensor reserves = rows_with_previous<Backend>(res, c_init, 4 * H, s, reverse, t_lo, t_hi, compute);
          res_rows = reserves.narrow(0, lead, n_rows);
          c_prev = reserves.narrow(0, B - lead, n_rows).narrow(1, 4 * H, H);
        }
      } else {
        h_prev = previous_states(out, h_init, s, reverse, t_lo, t_hi);
        out_rows = rows_in_compute_type(out, row_lo, n_rows);
        if (Cell::kHasCell) c_prev = previous_states(res.narrow(1, 4 * H, H), c_init, s, reverse, t_lo, t_hi);
      }
      // Where the chunk holds more steps than its float32 copies may (kMinChunkRows: batch 1), the
      // steps of a narrower-type layer without a cell state, run on this thread (one row group),
      // convert the reserve's and dL/d output's rows as they reach them, in parts of copy_steps
      // steps, or a kMaxParts-th of the chunk where that is more (conversions of fewer rows run on
      // one thread: GRU I=H=512 at batch 1, T=100, in parts of 14 steps, 3-4% slower), the output's
      // rows and h_prev, which W_hh's gradient reads, whole (GRU I=H=512 at batch 1, T=100: 1 MiB
      // of float32 copies, now 0.25 at a time; peak 7.1-7.3 -> 6.2-6.3 MiB, torch.nn 6.5-6.8).
      const int64_t part_steps = std::max(copy_steps, (last - first + kMaxParts - 1) / kMaxParts);
      const bool by_parts = narrow_storage && !s.packed && !Cell::kHasCell && !project &&
                            w_hh_step.row_groups == 1 && part_steps < last - first;
      if (!res_rows.defined() && !by_parts) res_rows = reserve_rows(row_lo, n_rows);
      const Tensor grad_out_rows = by_parts ? Tensor() : rows_in_compute_type(grad_out, row_lo, n_rows);
      const int64_t ld_grad_out = by_parts ? H_out : grad_out_rows.stride(0);
      a.ld_prev = Cell::kHasCell ? c_prev.stride(0) : h_prev.stride(0);
      bool ran = false;
      if constexpr (Backend::kPersistentRecurrence) {
        StepBackward<S> step = a;  // without a projection (persistent kernels have none)
        step.grad_h = ptr<S>(grad_out_rows);
        step.ld_grad_h = ld_grad_out;
        step.grad_h_rec = ptr<S>(grad_h_state);
        step.reserve = ptr<S>(res_rows);
        step.output = ptr<S>(out_rows);
        step.h_prev = ptr<S>(h_prev);
        step.c_prev = ptr<S>(c_prev);
        step.grad_gates = ptr<S>(grad_gates);
        step.grad_hidden_gates = ptr<S>(grad_hidden_gates);
        // After the sequence's first step, dL/dh_prev is dL/dhx: wanted only with hx_grad.
        ran = persistent.backward(
            RecurrenceChunk<StepBackward<S>>{step, s, !reverse, first, last, row_lo, hx_grad || last < T});
      }
      if (!ran) Backend::for_each_row_group(s, t_lo, t_hi, w_hh_step.row_groups, [&](int64_t row_begin, int64_t row_end) {
        StepBackward<S> step = a;
        // dL/dh_prev = dgates W_hh: without a projection each step's product is left pending and
        // done by the next step's backward_step, in the same pass as its pointwise step; the
        // chunk's last one is done here, before the next chunk reuses the gate gradient buffer.
        const S* pending = nullptr;  // the gate gradients of the step before, rows [row_begin, pending_end)
        int64_t pending_end = 0;
        Tensor part_res = res_rows, part_grad_out = grad_out_rows;  // from the chunk's row part_lo
        int64_t part_lo = row_lo;
        for (int64_t k = first; k < last; ++k) {
          if (by_parts && (k - first) % part_steps == 0) {  // steps [k, k_end), times [lo, hi)
            const int64_t k_end = std::min(last, k + part_steps);
            const int64_t lo = reverse ? k : T - k_end, hi = reverse ? k_end : T - k;
            part_lo = s.offset[lo];
            const int64_t part_rows = (hi < T ? s.offset[hi] : s.rows) - part_lo;
            part_res = reserve_rows(part_lo, part_rows);
            part_grad_out = rows_in_compute_type(grad_out, part_lo, part_rows);
          }
          const int64_t t = reverse ? k : T - 1 - k;
          const int64_t end = std::min(s.batch[t], row_end), row = s.offset[t], n = end - row_begin;
          if (n <= 0) continue;
          if (project) {
            // dL/dy = dL/dy from above + from the next step, then back through W_hr.
            S* dy = ptr<S>(grad_projected) + (row + row_begin) * H_out;
            const S* from_above = ptr<S>(part_grad_out) + (row - part_lo + row_begin) * H_out;
            const S* from_next = ptr<S>(grad_h_state) + row_begin * H_out;
            Backend::template add<S>(dy, from_above, from_next, n * H_out);
            w_hr_step.gemm(n, dy, H_out, S(0), ptr<S>(grad_unprojected) + row_begin * H, H);
            step.grad_h = ptr<S>(grad_unprojected);
            step.ld_grad_h = H;
            step.grad_h_rec = nullptr;
          } else {
            step.grad_h = ptr<S>(part_grad_out) + (row - part_lo) * ld_grad_out;
            step.ld_grad_h = ld_grad_out;
            step.grad_h_rec = ptr<S>(grad_h_state);
          }
          step.reserve = ptr<S>(part_res) + (row - part_lo) * R;
          step.output = ptr<S>(out_rows) + (row - row_lo) * H_out;
          step.h_prev = ptr<S>(h_prev) + (row - row_lo) * a.ld_prev;
          step.c_prev = Cell::kHasCell ? ptr<S>(c_prev) + (row - row_lo) * a.ld_prev : nullptr;
          step.grad_gates = ptr<S>(grad_gates) + (row - row_lo) * G * H;
          step.grad_hidden_gates = ptr<S>(grad_hidden_gates) + (row - row_lo) * G * H;
          Backend::template backward_step<Cell, S>(w_hh_step, pending, pending_end, step, row_begin, end);
          pending = step.grad_hidden_gates;
          pending_end = end;
          if (project) {  // the next step's dL/dy needs dL/dh_prev first
            if (hx_grad || k + 1 < T) grad_h_prev_from_gates<Cell>(w_hh_step, pending, a.grad_h_state, row_begin, pending_end);
            pending = nullptr;
          }
        }
        // After the sequence's first step, dL/dh_prev is dL/dhx: wanted only with hx_grad.
        if (pending != nullptr && (hx_grad || last < T))
          grad_h_prev_from_gates<Cell>(w_hh_step, pending, a.grad_h_state, row_begin, pending_end);
      });
      const Tensor dg = part(grad_gates, 0, 0, n_rows), dgh = part(grad_hidden_gates, 0, 0, n_rows);
      if (input_grad) {  // computed in the compute type, then rounded to the input's
        Tensor grad_input_rows = part(grad_input_by_row, 0, row_lo, n_rows);
        Tensor computed = grad_input.scalar_type() == compute ? grad_input_rows : Backend::empty({n_rows, I}, opts);
        w_ih_step.apply_out(computed, dg);
        if (!computed.is_same(grad_input_rows)) grad_input_rows.copy_(computed);
      }
      if (weight_grads) {
        Backend::template weight_grad_out<S>(grad_w_ih, dg, part(x, 0, row_lo, n_rows), first > 0, operands);
        Backend::template weight_grad_out<S>(grad_w_hh, dgh, h_prev, first > 0, operands);
      }
      if (bias_grads) {
        // dL/db_hh is dL/db_ih (copied after the loop) except for GRU, whose b_hn is inside r * (W_hn h + b_hn).
        if (first == 0) at::sum_out(grad_b_ih, dg, 0);
        else grad_b_ih.add_(dg.sum(0));
        if (Cell::kSeparateHiddenGates) {
          if (first == 0) at::sum_out(grad_b_hh, dgh, 0);
          else grad_b_hh.add_(dgh.sum(0));
        }
      }
    }
    if (project && weight_grads)
      Backend::template weight_grad_out<S>(grad_w_hr, grad_projected, to_type<Backend>(res.narrow(1, 5 * H, H), compute),
                                           false);
    if (bias_grads && !Cell::kSeparateHiddenGates && T > 0)
      Backend::template copy<S>(ptr<S>(grad_b_hh), ptr<S>(grad_b_ih), G * H);
  });

  if (T == 0 && weight_grads) grad_w_ih.zero_(), grad_w_hh.zero_();  // an empty packed sequence
  if (T == 0 && bias_grads) grad_b_ih.zero_(), grad_b_hh.zero_();
  Tensor grad_cx = Cell::kHasCell ? grad_c_state : empty();
  return {grad_input, hx_grad ? grad_h_state : empty(), grad_cx, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh, grad_w_hr};
}

// Returns {grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh, grad_w_hr};
// gradients of absent tensors (cx, biases, w_hr), grad_input without input_grad, grad_hx without
// hx_grad and the weights' and biases' without weight_grads are empty.
template <class Cell, class Backend>
std::vector<Tensor> layer_backward(const Tensor& grad_output, const Tensor& grad_hy, const Tensor& grad_cy,
                                   const Tensor& input, const c10::optional<Tensor>& batch_sizes,
                                   const Tensor& hx, const Tensor& cx, const LayerWeights& w,
                                   const Tensor& output, const Tensor& reserve, bool has_bias,
                                   bool reverse, bool relu, bool input_grad = true, bool weight_grads = true,
                                   bool hx_grad = true) {
  const at::ScalarType storage = input.scalar_type(), compute = compute_type<Backend>(storage);
  if (compute == storage)
    return layer_backward_in_compute_type<Cell, Backend>(grad_output, grad_hy, grad_cy, input, batch_sizes, hx, cx, w,
                                                         output, reserve, has_bias, reverse, relu, input_grad,
                                                         weight_grads, hx_grad, at::ScalarType::Undefined);
  // A storage type computed in a wider one: the input, the output, dL/d output, the reserve and
  // dL/d input, the largest tensors, are converted a chunk of rows at a time as the backward
  // reaches them; W_ih and W_hh by the backend, where it reads them in the compute type; the rest
  // up front.
  const auto up = [&](const Tensor& t) { return to_type<Backend>(t, compute); };
  return to_type<Backend>(layer_backward_in_compute_type<Cell, Backend>(
                              grad_output, up(grad_hy), up(grad_cy), input, batch_sizes, up(hx), up(cx),
                              to_type_except_gate_weights<Backend>(w, compute), output, reserve, has_bias, reverse, relu,
                              input_grad, weight_grads, hx_grad, storage),
                          storage);
}

}  // namespace fused_rnn
