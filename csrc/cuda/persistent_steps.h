// The step loops of the persistent recurrent kernels, written once over an execution model
// `Exec`: persistent.cu runs them as CUDA kernels (one CTA per part of W_hh, all co-resident),
// tests/cpp/test_persistent.cpp on the CPU, CTA by CTA and thread by thread, checking every
// shared- and global-memory access for races and bounds. The gate math is cells.h's.
//
// Exec provides, for the CTA it runs:
//   x.cta()                       this CTA's index
//   x.threads(f)                  f(tid) on every thread of the CTA, then a CTA barrier (a phase)
//   x.grid_sync()                 a barrier across all CTAs: what each wrote before is seen after
//   x.template shared<T>(offset)  T* at a byte offset into the CTA's dynamic shared memory
//   x.get(p), x.put(p, v)         a load / store (shared or global memory)
//   x.exchanged(p)                a load of global memory another CTA may have written this launch
//   x.copy16_exchanged(dst, src)  the same for 16 bytes, into shared memory (both 16-byte aligned)
//   x.zero16(dst)                 16 zero bytes into shared memory (16-byte aligned)
//   x.products(layout, m, v, partials, tid)
//                                 thread tid's share of the partial products of M and the vector
//                                 tile (persistent_plan.h's tasks) into the partials buffer
//   typename Exec::template IO<S> element loads and stores in the math type, for the cells
//   typename Exec::template Math<S>  that math type (float for float, float16 and bfloat16)
#pragma once

#include "persistent_plan.h"

#if defined(__CUDACC__)
#define FR_STEPS __device__ __forceinline__
#else
#define FR_STEPS inline
#endif

namespace fused_rnn {
namespace persistent {

template <typename S>
struct ForwardArgs {
  // Row-dependent pointers (reserve: the gate rows, output) at the launch's first row; c_state,
  // hidden_gates (GRU), bias_hn as for a step. h_state is not used: see h_buffers.
  StepForward<S> step;
  // [state_rows, H] each: step i reads h_prev from h_buffers[i % 2] and writes h_new to the
  // other; every CTA also carries its units' h of the rows a step leaves out, so after the last
  // step h_buffers[steps % 2] holds every row's state.
  S* h_buffers[2];
  S* hidden_gates;  // GRU: [state_rows, 3H], where W_hh h_prev goes (step.hidden_gates, writable)
  const S* w_hh;    // [G*H, H]
  int64_t state_rows;
  Layout layout;
  Schedule schedule;
};

template <typename S>
struct BackwardArgs {
  // Row-dependent pointers (grad_h, reserve, output, h_prev, c_prev, grad_gates,
  // grad_hidden_gates) at the launch's first row; grad_h_rec == grad_h_state and grad_c_state are
  // the carried state, as for a step.
  StepBackward<S> step;
  const S* w_hh;          // [G*H, H]
  float grad_h_prev_beta; // grad_h_state = beta grad_h_state + dgates W_hh (GRU 1: it holds z dh)
  bool last_product;      // whether the last step's dL/dh_prev is wanted
  Layout layout;
  Schedule schedule;
};

template <typename S>
FR_HD S* advance(S* p, int64_t values) { return p ? p + values : p; }

template <typename S>
FR_HD StepForward<S> forward_at_row(StepForward<S> a, int64_t row) {
  a.reserve = advance(a.reserve, row * a.ld_reserve);
  a.output = advance(a.output, row * a.ld_output);
  return a;
}

template <class Cell, typename S>
FR_HD StepBackward<S> backward_at_row(StepBackward<S> a, int64_t row) {
  a.grad_h = advance(a.grad_h, row * a.ld_grad_h);
  a.reserve = advance(a.reserve, row * a.ld_reserve);
  a.output = advance(a.output, row * a.ld_output);
  a.h_prev = advance(a.h_prev, row * a.ld_prev);
  a.c_prev = advance(a.c_prev, row * a.ld_prev);
  a.grad_gates = advance(a.grad_gates, row * Cell::kGates * a.hidden);
  a.grad_hidden_gates = advance(a.grad_hidden_gates, row * Cell::kGates * a.hidden);
  return a;
}

// A CTA's shared memory: its slice of W_hh (M), the vector tile and the partial sums.
template <typename S>
struct Shared {
  S* m;
  S* v;
  float* partials;
};

// Loads this CTA's slice of W_hh into M (zeros where M is padding).
template <typename S, class Exec>
FR_STEPS void load_matrix(Exec& x, const Layout& l, const S* w_hh, S* m) {
  const int64_t cta = x.cta(), values = int64_t(l.rows_pad) * l.k_pad;
  x.threads([&](int tid) {
    for (int64_t e = tid; e < values; e += kThreads) {
      // Forward rows are read along k, backward ones (W_hh columns) along the units.
      const int64_t r = l.backward ? e % l.rows_pad : e / l.k_pad, kk = l.backward ? e / l.rows_pad : e % l.k_pad;
      const int64_t element = matrix_element(l, cta, r, kk);
      x.put(m + r * l.ld_m + kk, element < 0 ? S{} : x.get(w_hh + element));
    }
  });
}

// Stages `rows` vectors of l.k values (row stride ld in global memory) into the vector tile,
// zeros past them: the product then runs on whole granules. 16 bytes at a time where the rows
// allow (every row 16-byte aligned, whole 16 bytes of values), else value by value.
template <typename S, class Exec>
FR_STEPS void stage_vectors(Exec& x, const Layout& l, const S* vectors, int64_t ld, int64_t rows, S* v, int tid) {
  constexpr int32_t kPerLoad = 16 / sizeof(S);
  if (reinterpret_cast<uintptr_t>(vectors) % 16 == 0 && ld % kPerLoad == 0 && l.k % kPerLoad == 0) {
    const int32_t loads_per_row = l.k_pad / kPerLoad;  // rows of the tile are 16-byte aligned: ld_v is
    for (int32_t e = tid; e < l.batch_tile * loads_per_row; e += kThreads) {
      const int32_t b = e / loads_per_row, kk = e % loads_per_row * kPerLoad;
      if (b < rows && kk < l.k) x.copy16_exchanged(v + b * l.ld_v + kk, vectors + b * ld + kk);
      else x.zero16(v + b * l.ld_v + kk);
    }
    return;
  }
  for (int32_t b = 0; b < l.batch_tile; ++b)
    for (int32_t kk = tid; kk < l.k_pad; kk += kThreads)
      x.put(v + b * l.ld_v + kk, b < rows && kk < l.k ? x.exchanged(vectors + b * ld + kk) : S{});
}

// Calls sum(r, b, total) for each M row r this CTA holds and tile row b < rows, with the total of
// the slices' partial products.
template <class Exec, class F>
FR_STEPS void for_each_sum(Exec& x, const Layout& l, const float* partials, int64_t rows, int tid, const F& sum) {
  const int32_t held = static_cast<int32_t>(held_rows(l)), units = static_cast<int32_t>(unit_count(l, x.cta()));
  for (int32_t e = tid; e < rows * held; e += kThreads) {
    const int32_t b = e / held, r = e % held;
    if (r % l.units_per_cta >= units) continue;  // past the last unit (last CTA)
    float total = 0.0f;
    for (int32_t slice = 0; slice < l.k_slices; ++slice) total += x.get(partials + partial_index(l, slice, r, b));
    sum(r, b, total);
  }
}

// The CTA's shared memory, its slice of W_hh loaded.
template <typename S, class Exec>
FR_STEPS Shared<S> hold_matrix(Exec& x, const Layout& l, const S* w_hh) {
  const Shared<S> shared{x.template shared<S>(l.m_offset), x.template shared<S>(l.v_offset),
                         x.template shared<float>(l.red_offset)};
  load_matrix(x, l, w_hh, shared.m);
  return shared;
}

// The product of M and `rows` vectors (rows from `vectors`, stride ld), tile by tile: calls
// sum(r, b, total) for every held row r and vector b. Phases: staging the first tile (with
// first_phase(tid), work of the caller's that touches neither), then per tile its products, then
// its sums together with staging the next tile (the sums read the partials and write global
// memory the staging does not read; the staging writes the vector tile the products are done with).
template <typename S, class Exec, class F, class G>
FR_STEPS void multiply(Exec& x, const Layout& l, const Shared<S>& shared, const S* vectors, int64_t ld, int64_t rows,
                       const F& sum, const G& first_phase) {
  const auto tile_rows = [&](int64_t b0) { return min64(l.batch_tile, rows - b0); };
  x.threads([&](int tid) {
    first_phase(tid);
    stage_vectors(x, l, vectors, ld, tile_rows(0), shared.v, tid);
  });
  for (int64_t b0 = 0; b0 < rows; b0 += l.batch_tile) {
    x.threads([&](int tid) { x.products(l, shared.m, shared.v, shared.partials, tid); });
    x.threads([&](int tid) {
      for_each_sum(x, l, shared.partials, tile_rows(b0), tid,
                   [&](int64_t r, int64_t b, float total) { sum(r, b0 + b, total); });
      const int64_t next = b0 + l.batch_tile;
      if (next < rows) stage_vectors(x, l, vectors + next * ld, ld, tile_rows(next), shared.v, tid);
    });
  }
}

// One CTA of the forward recurrence: per step, the recurrent product for its units' gates, then
// the cell's pointwise step for its units, then a grid barrier (the next step reads every unit's h).
template <class Cell, typename S, class Exec>
FR_STEPS void forward_steps(Exec& x, const ForwardArgs<S>& a) {
  using IO = typename Exec::template IO<S>;
  using V = typename Exec::template Math<S>;
  const Layout& l = a.layout;
  const int64_t H = a.step.hidden, G = Cell::kGates, first = first_unit(l, x.cta());
  const int32_t units = static_cast<int32_t>(unit_count(l, x.cta()));
  const Shared<S> shared = hold_matrix(x, l, a.w_hh);
  const int64_t steps = schedule_steps(a.schedule);
  Cursor c = first_step(a.schedule);
  for (int64_t i = 0; i < steps; ++i, c = next_step(a.schedule, c)) {
    const S* h_prev = a.h_buffers[i % 2];
    S* h_new = a.h_buffers[(i + 1) % 2];
    const StepForward<S> step_rows = forward_at_row(a.step, c.row);
    // The carried state: this CTA's units of every row, which the cell step then overwrites for
    // the step's rows (GRU reads h_prev there).
    const auto carry = [&](int tid) {
      for (int32_t e = tid; e < a.state_rows * units; e += kThreads) {
        const int64_t at = int64_t(e / units) * H + first + e % units;
        x.put(h_new + at, x.get(h_prev + at));
      }
    };
    // Gate pre-activations: the input projection's (already in the gate rows) + W_hh h_prev; GRU
    // keeps W_hh h_prev apart (its n gate scales W_hn h + b_hn by r).
    multiply(x, l, shared, h_prev, H, c.batch, [&](int64_t r, int64_t b, float total) {
      const RowTarget target = row_target(l, x.cta(), r);
      const int64_t column = target.part * H + target.unit;
      if constexpr (Cell::kSeparateHiddenGates) {
        IO::store(a.hidden_gates + b * G * H + column, V(total));
      } else {
        S* gate = step_rows.reserve + b * step_rows.ld_reserve + column;
        IO::store(gate, IO::load(gate) + V(total));
      }
    }, carry);
    x.threads([&](int tid) {
      StepForward<S> step = step_rows;
      step.h_state = h_new;
      for (int32_t e = tid; e < c.batch * units; e += kThreads)
        Cell::template forward<V, IO>(step, e / units, first + e % units);
    });
    if (i + 1 < steps) x.grid_sync();
  }
}

// One CTA of the backward recurrence: per step, the cell's backward pointwise step for its units
// (dL/dh from above and from the step after), a grid barrier (every unit's gate gradients are
// written), then dL/dh_prev = dgates W_hh for its units.
template <class Cell, typename S, class Exec>
FR_STEPS void backward_steps(Exec& x, const BackwardArgs<S>& a) {
  using IO = typename Exec::template IO<S>;
  using V = typename Exec::template Math<S>;
  const Layout& l = a.layout;
  const int64_t H = a.step.hidden, first = first_unit(l, x.cta());
  const int32_t units = static_cast<int32_t>(unit_count(l, x.cta()));
  const Shared<S> shared = hold_matrix(x, l, a.w_hh);
  const int64_t steps = schedule_steps(a.schedule);
  Cursor c = first_step(a.schedule);
  for (int64_t i = 0; i < steps; ++i, c = next_step(a.schedule, c)) {
    const StepBackward<S> step = backward_at_row<Cell>(a.step, c.row);
    x.threads([&](int tid) {
      for (int32_t e = tid; e < c.batch * units; e += kThreads)
        Cell::template backward<V, IO>(step, e / units, first + e % units);
    });
    if (i + 1 == steps && !a.last_product) break;
    x.grid_sync();
    multiply(x, l, shared, step.grad_hidden_gates, Cell::kGates * H, c.batch,
             [&](int64_t r, int64_t b, float total) {
               S* dh = step.grad_h_state + b * H + row_target(l, x.cta(), r).unit;
               IO::store(dh, a.grad_h_prev_beta * IO::load(dh) + V(total));
             },
             [](int) {});
  }
}

// ---- on the host: the launches that run a chunk of steps ---------------------------------------
//
// A chunk's steps k in [0, n), in processing order, have batch[k] rows starting at row[k] (rows
// relative to the chunk's first row, where the row-dependent pointers of `chunk` point). They run
// as one launch per schedule (for_each_schedule), each with its pointers at its own first row.

// Forward: the state is h_state (in, and out after the chunk), h_other a second buffer of the
// same size; copy(dst, src) copies one whole state buffer, launch(args) enqueues one launch.
template <typename S, class Copy, class Launch>
void run_forward_chunk(const ForwardArgs<S>& chunk, const int64_t* batch, const int64_t* row, int64_t n,
                       bool descending, S* h_state, S* h_other, const Copy& copy, const Launch& launch) {
  for_each_schedule(batch, n, descending, [&](const Schedule& schedule, int64_t first, int64_t steps) {
    ForwardArgs<S> args = chunk;
    args.schedule = schedule;
    args.step = forward_at_row(chunk.step, row[descending ? first + steps - 1 : first]);
    // Steps alternate between the buffers; the last one writes h_state.
    if (steps % 2) copy(h_other, h_state);
    args.h_buffers[0] = steps % 2 ? h_other : h_state;
    args.h_buffers[1] = steps % 2 ? h_state : h_other;
    launch(args);
  });
}

// Backward: chunk.last_product says whether the chunk's last step's dL/dh_prev is wanted; every
// launch but the chunk's last computes its own.
template <class Cell, typename S, class Launch>
void run_backward_chunk(const BackwardArgs<S>& chunk, const int64_t* batch, const int64_t* row, int64_t n,
                        bool descending, const Launch& launch) {
  for_each_schedule(batch, n, descending, [&](const Schedule& schedule, int64_t first, int64_t steps) {
    BackwardArgs<S> args = chunk;
    args.schedule = schedule;
    args.step = backward_at_row<Cell>(chunk.step, row[descending ? first + steps - 1 : first]);
    args.last_product = chunk.last_product || first + steps < n;
    launch(args);
  });
}

}  // namespace persistent
}  // namespace fused_rnn
