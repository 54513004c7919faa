// The plan and the index math of the persistent recurrent kernels (persistent.cu): which CTA
// holds which part of W_hh, how its shared memory is laid out, how its threads and warps split
// each step's matrix product, which rows each step covers. Framework-free and host+device
// (FR_HD), so the CUDA backend plans on the host with the same functions the kernels index with,
// and tests/cpp/test_persistent.cpp checks them, and runs the kernels' step loop, on the CPU.
//
// Each pass of a layer's recurrence is a matrix held on chip for the whole launch times a set of
// vectors exchanged between CTAs every step:
//   forward:  gates[b][p*H + j] (+)= sum_k W_hh[p*H + j][k] h_prev[b][k]   units j < H, G rows (p) per unit, K = H
//   backward: dh_prev[b][k]   (+)= sum_q W_hh[q][k] dgates[b][q]           units k < H, 1 row per unit, K = G*H
// CTA c owns a contiguous range of units (hidden units), so the cell's pointwise step for a unit
// runs in the CTA that computed its gates (forward), or that needs its dh (backward).
#pragma once

#include <cstdint>

#include "../cells.h"

namespace fused_rnn {
namespace persistent {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Batch rows staged per tile: a warp's MMA task keeps 4 accumulators per 8 rows (kMaxNTiles).
constexpr int kMaxBatchTile = 64;
constexpr int kMaxNTiles = kMaxBatchTile / 8;
// Runs of equal batch size a launch's schedule holds (kernel parameters); longer packed
// sequences are split into several launches.
constexpr int kMaxSegments = 128;

// How a CTA multiplies: float32 by FMA on 4x4 register tiles, float16/bfloat16 by tensor-core
// mma.sync.m16n8k16 accumulating in float32.
enum class Math : int32_t { kFma = 0, kMma = 1 };

FR_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
FR_HD int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }
FR_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
FR_HD int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

struct Pass {
  int64_t units;          // H
  int64_t rows_per_unit;  // G forward, 1 backward
  int64_t k;              // length of the products: H forward, G*H backward
  int32_t element_bytes;  // of the storage type (4 or 2)
  Math math;
  bool backward;
};

FR_HD Pass forward_pass(int64_t gates, int64_t hidden, int32_t element_bytes, Math math) {
  return {hidden, gates, hidden, element_bytes, math, false};
}

FR_HD Pass backward_pass(int64_t gates, int64_t hidden, int32_t element_bytes, Math math) {
  return {hidden, 1, gates * hidden, element_bytes, math, true};
}

// Why a pass cannot run persistently (kFits: it can).
enum class Verdict : int32_t { kFits = 0, kNoUnits, kTooManyUnits, kNoSharedMemory };

// What each CTA holds and where, for one pass at one batch size. Shared memory, in bytes from its
// start, 16-byte aligned:
//   [m_offset]   the matrix slice M, rows_pad rows of k_pad values (row stride ld_m values)
//   [v_offset]   a tile of batch_tile vectors, k_pad values each (row stride ld_v)
//   [red_offset] float partial products: k_slices x rows_pad x batch_tile
// Row r of M is unit r % units_per_cta of the CTA's range, row part r / units_per_cta (the gate).
// Columns k >= k, rows r >= units * rows_per_unit of the range, and vector rows beyond a step's
// batch are zeros.
struct Layout {
  Verdict verdict;
  Math math;
  bool backward;
  int32_t element_bytes;
  int64_t units, rows_per_unit, k;
  int32_t ctas, units_per_cta, rows_pad, k_pad, ld_m, ld_v, batch_tile, k_slices;
  int64_t m_offset, v_offset, red_offset, smem_bytes;
};

// Row granule of M (4x4 FMA tiles, m16 MMA tiles) and of the batch (4, n8).
FR_HD int32_t row_granule(Math math) { return math == Math::kMma ? 16 : 4; }
FR_HD int32_t batch_granule(Math math) { return math == Math::kMma ? 8 : 4; }
// k is split among tasks in groups of this many values (a float4, an MMA k16 step).
FR_HD int32_t k_granule(Math math) { return math == Math::kMma ? 16 : 4; }

// Row stride in values for rows of k_pad values: an odd multiple of 16 bytes, 16 bytes more than a
// multiple of 128, so the 8 rows that one quarter-warp (float4 loads) or one MMA fragment load
// (8 rows x 4 words) reads fall in distinct banks.
FR_HD int32_t padded_stride(int64_t k_pad, int32_t element_bytes) {
  const int64_t words = round_up(k_pad * element_bytes / 4, 32) + 4;
  return static_cast<int32_t>(words * 4 / element_bytes);
}

// Tasks that split one tile's product: FMA, one per thread (a 4x4 tile over a slice of k);
// MMA, one per warp (an m16 tile over a slice of k, every n8 tile of the batch). k is sliced so
// that there are about as many tasks as threads (warps), each slice at least one granule.
FR_HD int32_t choose_k_slices(Math math, int32_t rows_pad, int32_t batch_tile, int32_t k_pad) {
  const int64_t tiles = math == Math::kMma ? rows_pad / 16 : int64_t(rows_pad / 4) * (batch_tile / 4);
  const int64_t workers = math == Math::kMma ? kWarps : kThreads;
  const int64_t granules = k_pad / k_granule(math);
  return static_cast<int32_t>(max64(1, min64(workers / tiles, granules)));
}

FR_HD int64_t align16(int64_t bytes) { return round_up(bytes, 16); }

// The layout of `pass` at up to `batch` rows per step, on up to `max_ctas` co-resident CTAs with
// `smem_limit` bytes of shared memory each. Units are spread over as many CTAs as possible, but
// a CTA gets at least one row granule of real rows (below that, more CTAs only add to the cost
// of each step's grid barrier); the batch tile is the largest that fits.
FR_HD Layout plan_layout(const Pass& pass, int64_t batch, int64_t max_ctas, int64_t smem_limit) {
  Layout l{};
  l.math = pass.math;
  l.backward = pass.backward;
  l.element_bytes = pass.element_bytes;
  l.units = pass.units;
  l.rows_per_unit = pass.rows_per_unit;
  l.k = pass.k;
  l.verdict = Verdict::kFits;
  if (pass.units <= 0 || batch <= 0 || max_ctas <= 0) {
    l.verdict = Verdict::kNoUnits;
    return l;
  }
  const int64_t least_units = min64(pass.units, ceil_div(row_granule(pass.math), pass.rows_per_unit));
  const int64_t per_cta = max64(ceil_div(pass.units, max_ctas), least_units);
  const int64_t ctas = ceil_div(pass.units, per_cta);
  const int64_t rows_pad = round_up(per_cta * pass.rows_per_unit, row_granule(pass.math));
  const int64_t k_pad = round_up(pass.k, 16);
  if (ctas > max_ctas || rows_pad > (int64_t(1) << 20) || k_pad > (int64_t(1) << 24)) {
    l.verdict = Verdict::kTooManyUnits;
    return l;
  }
  l.ctas = static_cast<int32_t>(ctas);
  l.units_per_cta = static_cast<int32_t>(per_cta);
  l.rows_pad = static_cast<int32_t>(rows_pad);
  l.k_pad = static_cast<int32_t>(k_pad);
  l.ld_m = l.ld_v = padded_stride(k_pad, pass.element_bytes);
  l.m_offset = 0;
  l.v_offset = align16(int64_t(l.rows_pad) * l.ld_m * pass.element_bytes);
  const int32_t granule = batch_granule(pass.math);
  const auto with_tile = [&](int64_t tile) {
    Layout t = l;
    t.batch_tile = static_cast<int32_t>(tile);
    t.k_slices = choose_k_slices(pass.math, l.rows_pad, t.batch_tile, l.k_pad);
    t.red_offset = l.v_offset + align16(tile * l.ld_v * pass.element_bytes);
    t.smem_bytes = t.red_offset + int64_t(t.k_slices) * l.rows_pad * tile * 4;
    return t;
  };
  for (int64_t tile = min64(round_up(batch, granule), kMaxBatchTile); tile >= granule; tile -= granule) {
    const Layout largest = with_tile(tile);
    if (largest.smem_bytes > smem_limit) continue;
    // As many tiles as the largest that fits needs, of about equal size (64 rows in tiles of at
    // most 20: four of 16, not three of 20 and one of 4), unless their partials take more room.
    const Layout even = with_tile(round_up(ceil_div(batch, ceil_div(batch, tile)), granule));
    return even.smem_bytes <= smem_limit ? even : largest;
  }
  l.verdict = Verdict::kNoSharedMemory;
  return l;
}

// ---- ownership ------------------------------------------------------------------------------

FR_HD int64_t first_unit(const Layout& l, int64_t cta) { return cta * l.units_per_cta; }
FR_HD int64_t unit_count(const Layout& l, int64_t cta) {
  return min64(l.units_per_cta, l.units - first_unit(l, cta));
}
// Rows of M that hold matrix rows (the rest of rows_pad is padding).
FR_HD int64_t held_rows(const Layout& l) { return int64_t(l.units_per_cta) * l.rows_per_unit; }

// The element of W_hh ([rows_per_unit * units... as G*H rows] x H, row-major) at row r, column
// kk of CTA `cta`'s M, or -1 where M holds padding there. Forward: M row r is W_hh row
// part * H + unit; backward: M row r is W_hh column `unit`, so M[r][q] = W_hh[q][unit].
FR_HD int64_t matrix_element(const Layout& l, int64_t cta, int64_t r, int64_t kk) {
  if (r >= held_rows(l) || kk >= l.k) return -1;
  const int64_t part = r / l.units_per_cta, offset = r % l.units_per_cta;
  if (offset >= unit_count(l, cta)) return -1;
  const int64_t unit = first_unit(l, cta) + offset;
  return l.backward ? kk * l.units + unit : (part * l.units + unit) * l.units + kk;
}

// Where row r of M sends its sums: the unit (global index) and the row part (gate).
struct RowTarget {
  int64_t unit, part;
};
FR_HD RowTarget row_target(const Layout& l, int64_t cta, int64_t r) {
  return {first_unit(l, cta) + r % l.units_per_cta, r / l.units_per_cta};
}

// ---- the product's tasks ----------------------------------------------------------------------

// The granules of k in [begin, end) of slice `slice`: slices differ by at most one granule.
struct Range {
  int32_t begin, end;
};
FR_HD Range k_slice(const Layout& l, int32_t slice) {
  const int64_t granules = l.k_pad / k_granule(l.math);
  return {static_cast<int32_t>(granules * slice / l.k_slices),
          static_cast<int32_t>(granules * (slice + 1) / l.k_slices)};
}

// Index of the partial product of M row r and tile row b from slice `slice` in the float buffer.
FR_HD int64_t partial_index(const Layout& l, int32_t slice, int64_t r, int64_t b) {
  return (int64_t(slice) * l.rows_pad + r) * l.batch_tile + b;
}

// FMA: a 4x4 tile (M rows row..row+3, tile rows batch..batch+3) over the k values
// [4 * granules.begin, 4 * granules.end). Consecutive tasks (threads of a warp) take consecutive
// batch quads, then row quads, so that a quarter-warp reads few distinct rows of M.
struct FmaTask {
  int32_t slice, row, batch;
  Range granules;
};
FR_HD int32_t fma_task_count(const Layout& l) { return (l.rows_pad / 4) * (l.batch_tile / 4) * l.k_slices; }
FR_HD FmaTask fma_task(const Layout& l, int32_t task) {
  const int32_t quads = l.batch_tile / 4, tiles = (l.rows_pad / 4) * quads;
  const int32_t slice = task / tiles, tile = task % tiles;
  return {slice, (tile / quads) * 4, (tile % quads) * 4, k_slice(l, slice)};
}

// MMA: an m16 tile of M over the k16 steps [granules.begin, granules.end), against every n8 tile
// of the batch tile.
struct MmaTask {
  int32_t slice, m_tile;
  Range granules;
};
FR_HD int32_t mma_task_count(const Layout& l) { return (l.rows_pad / 16) * l.k_slices; }
FR_HD MmaTask mma_task(const Layout& l, int32_t task) {
  const int32_t m_tiles = l.rows_pad / 16;
  return {task / m_tiles, task % m_tiles, k_slice(l, task / m_tiles)};
}

// Fragments of mma.sync.aligned.m16n8k16.row.col (PTX ISA, "Matrix Fragments for mma.m16n8k16
// with floating point type"), lane l, group g = l / 4, t = l % 4. A (16x16, row-major) is four
// 32-bit registers of two consecutive k each: register r holds row g + 8 (r % 2), k 2t + 8 (r / 2)
// and the next k. B (16x8, k by n) is two registers: register r holds n = g, k 2t + 8 r and the
// next. The accumulator (16x8 float) is four: element r is row g + 8 (r / 2), column 2t + r % 2.
struct Coord {
  int32_t row, col;
};
FR_HD Coord mma_a_coord(int32_t lane, int32_t reg) { return {lane / 4 + 8 * (reg % 2), 2 * (lane % 4) + 8 * (reg / 2)}; }
FR_HD Coord mma_b_coord(int32_t lane, int32_t reg) { return {2 * (lane % 4) + 8 * reg, lane / 4}; }  // {k, n}
FR_HD Coord mma_c_coord(int32_t lane, int32_t element) { return {lane / 4 + 8 * (element / 2), 2 * (lane % 4) + element % 2}; }

// Offsets, in values, of the first of the two values of a lane's register in M and in the vector
// tile (stored [batch row][k], which is B's k-by-n as n-major: "col").
FR_HD int64_t mma_a_offset(const Layout& l, int32_t m_tile, int32_t k_step, int32_t lane, int32_t reg) {
  const Coord c = mma_a_coord(lane, reg);
  return int64_t(m_tile * 16 + c.row) * l.ld_m + k_step * 16 + c.col;
}
FR_HD int64_t mma_b_offset(const Layout& l, int32_t n_tile, int32_t k_step, int32_t lane, int32_t reg) {
  const Coord c = mma_b_coord(lane, reg);
  return int64_t(n_tile * 8 + c.col) * l.ld_v + k_step * 16 + c.row;
}

// ---- the steps of a launch ----------------------------------------------------------------------

// The steps one launch runs, in processing order, as runs of equal batch size (a packed sequence's
// batch sizes change at most once per sequence), and where their rows lie: rows are laid out by
// time, so when time runs backwards (`descending`) each step's rows come before the last one's.
// Row numbers are relative to the launch's first row.
struct Schedule {
  int32_t segments;
  int32_t batch[kMaxSegments];
  int32_t steps[kMaxSegments];
  int64_t rows;
  bool descending;
};

FR_HD int64_t schedule_steps(const Schedule& s) {
  int64_t n = 0;
  for (int32_t i = 0; i < s.segments; ++i) n += s.steps[i];
  return n;
}

// A position in a schedule: the step's batch and first row, and what is left of its run.
struct Cursor {
  int32_t segment, left;
  int64_t batch, row, done_rows;
};

FR_HD Cursor place(const Schedule& s, Cursor c) {
  c.batch = c.segment < s.segments ? s.batch[c.segment] : 0;
  c.row = s.descending ? s.rows - c.done_rows - c.batch : c.done_rows;
  return c;
}
FR_HD Cursor first_step(const Schedule& s) {
  Cursor c{};
  c.left = s.segments > 0 ? s.steps[0] : 0;
  return place(s, c);
}
FR_HD Cursor next_step(const Schedule& s, Cursor c) {
  c.done_rows += c.batch;
  if (--c.left == 0 && ++c.segment < s.segments) c.left = s.steps[c.segment];
  return place(s, c);
}

// Splits the steps whose batch sizes are batch[0..n) (processing order) into schedules of at most
// kMaxSegments runs; calls emit(schedule, first step, steps) for each, in order.
template <class Emit>
void for_each_schedule(const int64_t* batch, int64_t n, bool descending, const Emit& emit) {
  int64_t first = 0;
  while (first < n) {
    Schedule s{};
    s.descending = descending;
    int64_t k = first;
    for (; k < n; ++k) {
      if (s.segments == 0 || s.batch[s.segments - 1] != batch[k]) {
        if (s.segments == kMaxSegments) break;
        s.batch[s.segments] = static_cast<int32_t>(batch[k]);
        s.steps[s.segments++] = 0;
      }
      ++s.steps[s.segments - 1];
      s.rows += batch[k];
    }
    emit(s, first, k - first);
    first = k;
  }
}

}  // namespace persistent
}  // namespace fused_rnn
