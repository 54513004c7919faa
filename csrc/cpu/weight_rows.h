// The per-step GEMMs of a weight read where it lies, for steps of a single row, with W row-major
// (as the layer's parameters hold it): WeightRows for C = A W^T, each value of C the dot product of
// A's row with a row of W (the forward's h_prev W_hh^T), and RowCombinations for C = A W, C's row
// the combination of W's rows that A's row weighs (the backward's dL/dh_prev = dgates W_hh). A
// step of one row reads every weight once, so it is bound by reading W. The panels' kernel then
// keeps only as many independent sums as its panel has vectors (2 to 4), too few to hide the FMA's
// latency, while these keep 8 (AVX2) or more; and no copy of the weight is made: at batch 1 the
// copy would be several times the memory the whole call needs besides it.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>

namespace fused_rnn {

// C = A W^T, W [gates * units, k]. Like Panels, the columns of C form `gates` groups of `units`
// (the gates of a cell); block p holds the same kWidth units of every gate, so the cell's
// pointwise step for those units can follow the block's dot products directly.
template <typename S>
class WeightRows {
 public:
  using V = at::vec::Vectorized<S>;
  static constexpr int64_t kWidth = V::size();

  WeightRows() = default;
  // w: row-major [gates * units, k].
  WeightRows(const S* w, int64_t k, int64_t gates, int64_t units)
      : w_(w), k_(k), gates_(gates), units_(units), count_((units + kWidth - 1) / kWidth) {}

  bool defined() const { return w_ != nullptr; }
  int64_t count() const { return count_; }
  // The units of block p, as Panels names them (one vector of units per block).
  int64_t unit_vectors() const { return 1; }
  int64_t unit(int64_t p, int64_t) const { return p * kWidth; }
  int64_t valid_lanes(int64_t p, int64_t) const { return std::clamp<int64_t>(units_ - unit(p, 0), 0, kWidth); }
  // Multiply-adds in one row of one block.
  int64_t row_work() const { return gates_ * kWidth * k_; }

  // Rows [0, rows) of C for block p's columns: C = A W^T + beta C, A's row r at a + r * lda.
  // (C is not read where beta is 0.)
  void block(int64_t p, int64_t rows, const S* a, int64_t lda, S beta, S* c, int64_t ldc) const {
    const int64_t first = unit(p, 0), lanes = valid_lanes(p, 0);
    for (int64_t g = 0; g < gates_; ++g) {
      const S* w = w_ + (g * units_ + first) * k_;
      for (int64_t r = 0; r < rows; ++r) {
        V sums = dots(w, lanes, a + r * lda);
        S* out = c + r * ldc + g * units_ + first;
        if (beta != S(0)) sums = at::vec::fmadd(V::loadu(out, lanes), V(beta), sums);
        sums.store(out, lanes);
      }
    }
  }

 private:
  // Lane l: the dot product of W's row l (from w; rows past `lanes` repeat the last) with x. Each
  // row's products are summed a vector at a time, lane i taking the k = i mod kWidth in order,
  // then the lanes added up: kWidth independent chains of FMAs.
  __attribute__((noinline)) V dots(const S* w, int64_t lanes, const S* x) const {
    V acc[kWidth];
    const S* row[kWidth];
#pragma GCC unroll 16
    for (int l = 0; l < kWidth; ++l) acc[l] = V(S(0)), row[l] = w + std::min<int64_t>(l, lanes - 1) * k_;
    int64_t i = 0;
    for (; i + kWidth <= k_; i += kWidth) {
      const V xv = V::loadu(x + i);
#pragma GCC unroll 16
      for (int l = 0; l < kWidth; ++l) acc[l] = at::vec::fmadd(V::loadu(row[l] + i), xv, acc[l]);
    }
    if (i < k_) {  // the last k % kWidth values (the loads fill the rest of the vector with zeros)
      const int count = static_cast<int>(k_ - i);
      const V xv = V::loadu(x + i, count);
#pragma GCC unroll 16
      for (int l = 0; l < kWidth; ++l) acc[l] = at::vec::fmadd(V::loadu(row[l] + i, count), xv, acc[l]);
    }
    return lane_sums(acc);
  }

  // A vector whose lane l is the sum of acc[l]'s lanes (in lane order): acc transposed through
  // memory, then its rows added.
  static V lane_sums(const V (&acc)[kWidth]) {
    S stored[kWidth * kWidth], transposed[kWidth * kWidth];
#pragma GCC unroll 16
    for (int l = 0; l < kWidth; ++l) acc[l].store(stored + l * kWidth);
    at::vec::transpose_mxn<S, kWidth, kWidth>(stored, kWidth, transposed, kWidth);
    V sums = V::loadu(transposed);
#pragma GCC unroll 16
    for (int l = 1; l < kWidth; ++l) sums = sums + V::loadu(transposed + l * kWidth);
    return sums;
  }

  const S* w_ = nullptr;
  int64_t k_ = 0, gates_ = 1, units_ = 0, count_ = 0;
};

// C = A W + beta C, W [k, n], a row at a time: blocks of kBlockVectors vectors of C's columns, a
// thread taking a contiguous range of them (see combine). Each value is beta C + the products in
// order of k, as the panels' kernel adds them.
template <typename S>
class RowCombinations {
 public:
  using V = at::vec::Vectorized<S>;
  static constexpr int64_t kWidth = V::size();
  static constexpr int64_t kBlockVectors = 4;

  RowCombinations() = default;
  RowCombinations(const S* w, int64_t k, int64_t n)
      : w_(w), k_(k), n_(n), count_((n + kBlockVectors * kWidth - 1) / (kBlockVectors * kWidth)) {}

  bool defined() const { return w_ != nullptr; }
  int64_t count() const { return count_; }
  // The columns (a cell's units) of block p, as Panels names them.
  int64_t unit_vectors() const { return kBlockVectors; }
  int64_t unit(int64_t p, int64_t v) const { return (p * kBlockVectors + v) * kWidth; }
  int64_t valid_lanes(int64_t p, int64_t v) const { return std::clamp<int64_t>(n_ - unit(p, v), 0, kWidth); }
  // Multiply-adds in one row of one block.
  int64_t row_work() const { return kBlockVectors * kWidth * k_; }

  // C's row at c, the columns of blocks [begin, end): c = a W + beta c (a: one row of k values).
  // W's rows are read in order, each over the blocks' columns, kRows at a time: a thread streams
  // through its columns of W while that part of C's row stays in L1.
  void combine(int64_t begin, int64_t end, const S* a, S beta, S* c) const {
    const int64_t col_begin = unit(begin, 0), col_end = std::min(n_, unit(end, 0));
    for (int64_t col = col_begin; col < col_end; col += kWidth) {
      const int count = static_cast<int>(std::min(kWidth, col_end - col));
      const V start = beta == S(0) ? V(S(0)) : at::vec::fmadd(V::loadu(c + col, count), V(beta), V(S(0)));
      start.store(c + col, count);
    }
    int64_t i = 0;
    for (; i + kRows <= k_; i += kRows) add_rows<kRows>(i, a, c, col_begin, col_end);
    for (; i < k_; ++i) add_rows<1>(i, a, c, col_begin, col_end);
  }

 private:
  static constexpr int kRows = 8;

  // c[col_begin, col_end) += a[i + r] W[i + r, ...] for r < R, in order of r.
  template <int R>
  void add_rows(int64_t i, const S* a, S* c, int64_t col_begin, int64_t col_end) const {
    V weights[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) weights[r] = V(a[i + r]);
    const S* w = w_ + i * n_;
    int64_t col = col_begin;
    for (; col + kWidth <= col_end; col += kWidth) {
      V sum = V::loadu(c + col);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) sum = at::vec::fmadd(weights[r], V::loadu(w + r * n_ + col), sum);
      sum.store(c + col);
    }
    if (col < col_end) {
      const int count = static_cast<int>(col_end - col);
      V sum = V::loadu(c + col, count);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) sum = at::vec::fmadd(weights[r], V::loadu(w + r * n_ + col, count), sum);
      sum.store(c + col, count);
    }
  }

  const S* w_ = nullptr;
  int64_t k_ = 0, n_ = 0, count_ = 0;
};

}  // namespace fused_rnn
