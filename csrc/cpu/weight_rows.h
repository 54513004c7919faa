// The per-step GEMMs of a weight read where it lies, with W row-major (as the layer's parameters hold
// it): WeightRows for C = A W^T, each value of C the dot product of A's row with a row of W (the
// forward's h_prev W_hh^T), and RowCombinations for C = A W, C's row the combination of W's rows
// that A's row weighs (the backward's dL/dh_prev = dgates W_hh). The backend uses them where the
// layout of W in panels would not pay (backend.cpp, reads_in_place): steps of a single row, and
// (WeightRows) calls of a few steps over a few rows. A step of one row reads every weight once, so
// it is bound by reading W. The panels' kernel then keeps only as many independent sums as its
// panel has vectors (2 to 4), too few to hide the FMA's latency, while these keep 8 (AVX2) or more;
// and no copy of the weight is made: at batch 1 the copy would be several times the memory the
// whole call needs besides it, and for a single step of a batch it costs more time than the GEMM.
// With several rows, WeightRows takes them in pairs over a block of W's rows (a chunk of k at a
// time, which stays in L1 while every pair reads it), each vector of W loaded once for two rows.
// BroadcastRows, for steps of many rows, multiplies a large W_hh where it lies as the panels'
// kernel would multiply it laid out (backend.cpp, broadcasts): A is transposed instead of W.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "bf16_instructions.h"

namespace fused_rnn {

// v, kept in a register: an empty asm statement claims to change it, so that the compiler cannot
// fold its load into each instruction that uses it (GCC otherwise loads dots' vector of W once
// per row of A: 10 loads per 8 FMAs instead of 6, ~50 against ~85 GFLOP/s on a Zen 3 core in L1).
#if defined(CPU_CAPABILITY_AVX512)
using RawFloats = __m512;
using RawDoubles = __m512d;
#define FUSED_RNN_VECTOR_REGISTER "+v"
#elif defined(CPU_CAPABILITY_AVX2)
using RawFloats = __m256;
using RawDoubles = __m256d;
#define FUSED_RNN_VECTOR_REGISTER "+x"
#endif
template <typename S>
inline at::vec::Vectorized<S> in_register(at::vec::Vectorized<S> v) {
#if defined(FUSED_RNN_VECTOR_REGISTER)
  if constexpr (std::is_same_v<S, float>) {
    RawFloats raw = v;
    asm("" : FUSED_RNN_VECTOR_REGISTER(raw));
    return raw;
  } else {
    RawDoubles raw = v;
    asm("" : FUSED_RNN_VECTOR_REGISTER(raw));
    return raw;
  }
#else
  return v;
#endif
}

// A weight W [gates * units, k] read where it lies, in blocks of kWidth units of every gate: like
// Panels, the columns of C = A W^T form `gates` groups of `units` (the gates of a cell), and block p
// holds the same kWidth units of every gate, so that the cell's pointwise step for those units can
// follow the block's products directly. What WeightRows and BroadcastRows share. W's values are E:
// S, or bfloat16 (WeightRows<float, c10::BFloat16>, multiplying in bfloat16).
template <typename S, typename E = S>
class WeightRowBlocks {
 public:
  using V = at::vec::Vectorized<S>;
  static constexpr int64_t kWidth = V::size();

  WeightRowBlocks() = default;
  // w: row-major [gates * units, k]. With `w_tail`, W = [w, w_tail] joined along k, as Panels
  // joins them: w is [gates * units, k - k_tail] and w_tail [gates * units, k_tail].
  WeightRowBlocks(const E* w, int64_t k, int64_t gates, int64_t units, const E* w_tail = nullptr, int64_t k_tail = 0)
      : w_(w), w_tail_(w_tail), k_(k - k_tail), k_tail_(k_tail), gates_(gates), units_(units),
        count_((units + kWidth - 1) / kWidth) {}

  bool defined() const { return w_ != nullptr; }
  int64_t count() const { return count_; }
  // The units of block p, as Panels names them (one vector of units per block).
  int64_t unit_vectors() const { return 1; }
  int64_t unit(int64_t p, int64_t) const { return p * kWidth; }
  int64_t valid_lanes(int64_t p, int64_t) const { return std::clamp<int64_t>(units_ - unit(p, 0), 0, kWidth); }
  // Multiply-adds in one row of one block.
  int64_t row_work() const { return gates_ * kWidth * (k_ + k_tail_); }

 protected:
  const E* w_ = nullptr;
  const E* w_tail_ = nullptr;
  int64_t k_ = 0, k_tail_ = 0, gates_ = 1, units_ = 0, count_ = 0;  // k_: w's part of k
};

// C = A W^T, each value of C the dot product of A's row with a row of W. With E bfloat16 (S float),
// A's rows are bfloat16 too, each product of a pair of k summed in float32 by the AVX512-BF16
// instruction (AVX-512 build; the AVX2 build by FMAs on the pair widened), as the bfloat16 panels
// multiply; such a W has no w_tail (the steps that read it, of one row, never fold the input in).
template <typename S, typename E = S>
class WeightRows : public WeightRowBlocks<S, E> {
  using Base = WeightRowBlocks<S, E>;
  using Base::w_, Base::w_tail_, Base::k_, Base::k_tail_, Base::gates_, Base::units_;

 public:
  using Base::Base;
  using typename Base::V;
  using Base::kWidth, Base::unit, Base::valid_lanes;

  // Rows [0, rows) of C for block p's columns: C = A W^T + beta C (+ bias, length gates * units,
  // where given), A's row r at a + r * lda; with a w_tail, A is joined the same way, its last
  // k_tail columns at a_tail + r * lda_tail. (C is not read where beta is 0.)
  void block(int64_t p, int64_t rows, const E* a, int64_t lda, S beta, S* c, int64_t ldc, const S* bias = nullptr,
             const E* a_tail = nullptr, int64_t lda_tail = 0) const {
    const int64_t first = unit(p, 0), lanes = valid_lanes(p, 0);
    for (int64_t g = 0; g < gates_; ++g) {
      const int64_t row = g * units_ + first;
      // Row r's dot products for the block's units of gate g into C.
      const auto store = [&](int64_t r, V sums) {
        if (bias != nullptr) sums = sums + V::loadu(bias + row, lanes);
        S* out = c + r * ldc + row;
        if (beta != S(0)) sums = at::vec::fmadd(V::loadu(out, lanes), V(beta), sums);
        sums.store(out, lanes);
      };
      if constexpr (!std::is_same_v<E, S>) {  // bfloat16: a row of A at a time (the steps of batch 1)
        TORCH_INTERNAL_ASSERT_DEBUG_ONLY(k_tail_ == 0, "bfloat16 weight rows have no w_tail");
        for (int64_t r = 0; r < rows; ++r) store(r, pair_sums(w_ + row * k_, k_, a + r * lda, lanes));
      } else {
        for (int64_t r0 = 0; r0 < rows; r0 += kRowGroup) {
          const int64_t group = std::min(kRowGroup, rows - r0);
          // The sums of the group's rows only, in raw storage: V's default constructor zeroes, and
          // zeroing all kRowGroup x kWidth vectors (16 KiB with AVX-512) cost a step of one row
          // more than its products (AVX-512 Zen 4, LSTM T=100 B=1 inference: I=H=64 0.46 -> 0.24
          // ms, I=H=128 1.0 -> 0.6-0.8 ms).
          alignas(V) unsigned char storage[sizeof(V) * kRowGroup * kWidth];
          V(&acc)[kRowGroup][kWidth] = *reinterpret_cast<V(*)[kRowGroup][kWidth]>(storage);
          for (int64_t r = 0; r < group; ++r)
#pragma GCC unroll 16
            for (int l = 0; l < kWidth; ++l) new (&acc[r][l]) V(S(0));
          dot_rows(acc, group, w_ + row * k_, k_, a + r0 * lda, lda, lanes);
          if (k_tail_ > 0) dot_rows(acc, group, w_tail_ + row * k_tail_, k_tail_, a_tail + r0 * lda_tail, lda_tail, lanes);
          for (int64_t r = 0; r < group; ++r) store(r0 + r, lane_sums(acc[r]));
        }
      }
    }
  }

 private:
  // Rows of A whose sums a block keeps at a time, and the values of k per pass over W's rows (up
  // to 16 KiB of them, which stay in L1 while the rows of A read them).
  static constexpr int64_t kRowGroup = 16;
  static constexpr int64_t kChunk = 16384 / (kWidth * sizeof(S));
  // W's rows per pass of two rows of A (dots): 2 * kPassRows chains.
  static constexpr int kPassRows = kWidth >= 8 ? kWidth / 2 : kWidth;

  // acc[r][l] += the dot products of W's row l (from w, rows k apart) with A's row r (from x,
  // rows ldx apart), r < rows: two rows of A at a time over chunks of k, whose part of W stays in
  // L1 while every pair reads it; an odd last row alone, over all of k at once.
  static void dot_rows(V (&acc)[kRowGroup][kWidth], int64_t rows, const S* w, int64_t k, const S* x, int64_t ldx,
                       int64_t lanes) {
    for (int l = 0; l < kWidth; l += kPassRows)
      for (int64_t i = 0; i < k; i += kChunk)
        for (int64_t r = 0; r + 1 < rows; r += 2)
          dots<kPassRows, 2>({acc[r] + l, acc[r + 1] + l}, w + i, k, std::min(kChunk, k - i), l, lanes,
                             {x + r * ldx + i, x + (r + 1) * ldx + i});
    if (rows % 2) dots<kWidth, 1>({acc[rows - 1]}, w, k, k, 0, lanes, {x + (rows - 1) * ldx});
  }

  // acc[a][l] += the products of W's row l0 + l (l < WRows; from w, rows ld apart; rows past
  // `lanes` repeat the last) with A's row x[a] (a < ARows), over k values, a vector at a time: lane
  // i takes the k = i mod kWidth in order, so WRows x ARows independent chains of FMAs, each row of
  // A's sums in the same order however many rows run beside it. With two rows of A, each vector of
  // W is loaded once for both.
  // (The sums are copied in and out once: kept in registers, not read back through a pointer the
  // loads of w and x might alias.)
  template <int WRows, int ARows>
  static __attribute__((noinline)) void dots(V* const (&acc_io)[ARows], const S* w, int64_t ld, int64_t k, int l0,
                                             int64_t lanes, const S* const (&x)[ARows]) {
    V acc[ARows][WRows];
    const S* row[WRows];
#pragma GCC unroll 16
    for (int l = 0; l < WRows; ++l) row[l] = w + std::min<int64_t>(l0 + l, lanes - 1) * ld;
#pragma GCC unroll 2
    for (int a = 0; a < ARows; ++a)
#pragma GCC unroll 16
      for (int l = 0; l < WRows; ++l) acc[a][l] = acc_io[a][l];
    int64_t i = 0;
    for (; i + kWidth <= k; i += kWidth) {
      V xv[ARows];
#pragma GCC unroll 2
      for (int a = 0; a < ARows; ++a) xv[a] = V::loadu(x[a] + i);
#pragma GCC unroll 16
      for (int l = 0; l < WRows; ++l) {
        V wv = V::loadu(row[l] + i);
        if constexpr (ARows > 1) wv = in_register(wv);
#pragma GCC unroll 2
        for (int a = 0; a < ARows; ++a) acc[a][l] = at::vec::fmadd(wv, xv[a], acc[a][l]);
      }
    }
    if (i < k) {  // the last k % kWidth values (the loads fill the rest of the vector with zeros)
      const int count = static_cast<int>(k - i);
      V xv[ARows];
#pragma GCC unroll 2
      for (int a = 0; a < ARows; ++a) xv[a] = V::loadu(x[a] + i, count);
#pragma GCC unroll 16
      for (int l = 0; l < WRows; ++l) {
        const V wv = V::loadu(row[l] + i, count);
#pragma GCC unroll 2
        for (int a = 0; a < ARows; ++a) acc[a][l] = at::vec::fmadd(wv, xv[a], acc[a][l]);
      }
    }
#pragma GCC unroll 2
    for (int a = 0; a < ARows; ++a)
#pragma GCC unroll 16
      for (int l = 0; l < WRows; ++l) acc_io[a][l] = acc[a][l];
  }

  // A vector whose lane l is the dot product of W's row l (rows k apart from w; rows past `lanes`
  // repeat the last) with x, in bfloat16 (E) summed in float32 (S): each row's sum runs in 16
  // lanes, a vector of pairs of k at a time (kWidth independent chains), then the rows' 16 lanes are
  // added in a tree of shuffles in registers (through memory, as lane_sums adds them, the sums took
  // half as long as the products at k = 512). Out of line: its 16 accumulators stay apart from
  // the caller's loop over the row blocks.
  static __attribute__((noinline)) V pair_sums(const E* w, int64_t k, const E* x, int64_t lanes) {
#if defined(CPU_CAPABILITY_AVX512)
    static_assert(std::is_same_v<S, float> && sizeof(E) == 2 && kWidth == 16, "bfloat16 rows sum in float32");
    constexpr int64_t kValues = 2 * kWidth;  // bfloat16 values of k per vector
    __m512 acc[kWidth];
    const E* row[kWidth];
#pragma GCC unroll 16
    for (int l = 0; l < kWidth; ++l) acc[l] = _mm512_setzero_ps(), row[l] = w + std::min<int64_t>(l, lanes - 1) * k;
    int64_t i = 0;
    for (; i + kValues <= k; i += kValues) {
      const __m512i xv = _mm512_loadu_si512(x + i);
#pragma GCC unroll 16
      for (int l = 0; l < kWidth; ++l) acc[l] = dot_bf16_pairs(acc[l], _mm512_loadu_si512(row[l] + i), xv);
    }
    if (i < k) {  // the last k % 32 values, the rest of the vectors zero (an odd last pair's too)
      const __mmask32 mask = static_cast<__mmask32>((uint64_t(1) << (k - i)) - 1);
      const __m512i xv = _mm512_maskz_loadu_epi16(mask, x + i);
#pragma GCC unroll 16
      for (int l = 0; l < kWidth; ++l) acc[l] = dot_bf16_pairs(acc[l], _mm512_maskz_loadu_epi16(mask, row[l] + i), xv);
    }
    // 16 rows -> 8 vectors, each 128-bit lane holding two rows' partial sums [a b a b]; -> 4, each
    // 128-bit lane four rows' [a b c d]; -> 2, then 1, adding 128-bit lanes: lane l is row l's sum.
    __m512 two[8], four[4], eight[2];
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i)
      two[i] = _mm512_add_ps(_mm512_unpacklo_ps(acc[2 * i], acc[2 * i + 1]),
                             _mm512_unpackhi_ps(acc[2 * i], acc[2 * i + 1]));
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i)
      four[i] = _mm512_add_ps(_mm512_shuffle_ps(two[2 * i], two[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                              _mm512_shuffle_ps(two[2 * i], two[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
#pragma GCC unroll 2
    for (int i = 0; i < 2; ++i)
      eight[i] = _mm512_add_ps(_mm512_shuffle_f32x4(four[2 * i], four[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                               _mm512_shuffle_f32x4(four[2 * i], four[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(eight[0], eight[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(eight[0], eight[1], _MM_SHUFFLE(3, 1, 3, 1)));
#elif defined(CPU_CAPABILITY_AVX2)
    // No dot-product instruction: 8 rows, 16 values of k (8 pairs) a vector, each pair widened to
    // float32 (even_bf16s, odd_bf16s) and its even k's products added before its odd k's.
    static_assert(std::is_same_v<S, float> && sizeof(E) == 2 && kWidth == 8, "bfloat16 rows sum in float32");
    constexpr int64_t kValues = 2 * kWidth;
    __m256 acc[kWidth];
    const E* row[kWidth];
#pragma GCC unroll 8
    for (int l = 0; l < kWidth; ++l) acc[l] = _mm256_setzero_ps(), row[l] = w + std::min<int64_t>(l, lanes - 1) * k;
    const auto pairs_at = [](const E* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); };
    // Each row's vector loaded as it is multiplied: 8 sums, A's two halves and one row in registers.
    const auto add = [&](const E* const (&rows)[kWidth], int64_t at, __m256i xv) {
      const __m256 x_even = even_bf16s(xv), x_odd = odd_bf16s(xv);
#pragma GCC unroll 8
      for (int l = 0; l < kWidth; ++l) {
        const __m256i wv = pairs_at(rows[l] + at);
        acc[l] = _mm256_fmadd_ps(odd_bf16s(wv), x_odd, _mm256_fmadd_ps(even_bf16s(wv), x_even, acc[l]));
      }
    };
    int64_t i = 0;
    for (; i + kValues <= k; i += kValues) add(row, i, pairs_at(x + i));
    if (i < k) {  // the last k % 16 values, the rest of the vectors zero (an odd last pair's too)
      alignas(32) E tail[kWidth + 1][kValues] = {};
      const E* tail_rows[kWidth];
      for (int l = 0; l < kWidth; ++l) std::copy(row[l] + i, row[l] + k, tail[l]), tail_rows[l] = tail[l];
      std::copy(x + i, x + k, tail[kWidth]);
      add(tail_rows, 0, pairs_at(tail[kWidth]));
    }
    // 8 rows -> 4 vectors of pairwise sums -> 2, each 128-bit lane holding four rows' partial sums
    // [a b c d]; then the two 128-bit lanes added: lane l is row l's sum.
    __m256 two[4], four[2];
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) two[j] = _mm256_hadd_ps(acc[2 * j], acc[2 * j + 1]);
#pragma GCC unroll 2
    for (int j = 0; j < 2; ++j) four[j] = _mm256_hadd_ps(two[2 * j], two[2 * j + 1]);
    return _mm256_add_ps(_mm256_permute2f128_ps(four[0], four[1], 0x20), _mm256_permute2f128_ps(four[0], four[1], 0x31));
#else
    (void)w, (void)k, (void)x, (void)lanes;
    TORCH_INTERNAL_ASSERT(false, "bfloat16 weight rows need the AVX-512 or AVX2 build");
    return V();
#endif
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
};

// C = A W^T + beta C (+ bias) for many rows, W [gates * units, k] read where it lies, as C^T =
// W A^T: each step first transposes A's rows into panels of 2 or 3 vectors of rows (transpose: m x k
// values against the GEMM's m x n x k), then each value of W is broadcast against a panel's vectors.
// 4 or 6 rows of W by a panel's rows keep 12 sums in registers, as the panels' kernel keeps rows of
// A by vectors of W, and each value of C is beta C + bias + the products in order of k, summed
// exactly as that kernel sums it. The weight needs no copy, nor a pass to lay it out. Blocks of
// units as WeightRows names them.
template <typename S>
class BroadcastRows : public WeightRowBlocks<S> {
  using Base = WeightRowBlocks<S>;
  using Base::w_, Base::w_tail_, Base::k_, Base::k_tail_, Base::gates_, Base::units_;

 public:
  using typename Base::V;
  using Base::kWidth, Base::unit, Base::valid_lanes;

  BroadcastRows() = default;
  BroadcastRows(const S* w, int64_t k, int64_t gates, int64_t units, const S* w_tail = nullptr, int64_t k_tail = 0)
      : Base(w, k, gates, units, w_tail, k_tail) {
    TORCH_CHECK(gates <= kMaxGates, "fused_rnn: BroadcastRows takes at most ", kMaxGates, " gates, got ", gates);
  }

  // A^T for m rows: padded_rows(m) x k values in panel_count(m) panels. Panel q holds rows
  // [panel_first(q), panel_end(q)), its value (i, r) at (panel_first(q) k + i width + r), rows
  // past m zero. Panels are of 3 vectors of rows, but where that would leave one vector at the end
  // the last two are of 2 (a panel of one vector keeps too few sums to hide the FMA's latency).
  static int64_t padded_rows(int64_t m) { return (m + kWidth - 1) / kWidth * kWidth; }
  static int64_t panel_count(int64_t m) {
    const int64_t n = padded_rows(m) / kWidth;
    return n / 3 + (n % 3 != 0);
  }
  static int64_t panel_first(int64_t q, int64_t m) {
    const int64_t n = padded_rows(m) / kWidth;
    return (3 * q - (n % 3 == 1 && n > 1 && q == n / 3 ? 1 : 0)) * kWidth;
  }
  static int64_t panel_end(int64_t q, int64_t m) {
    return q + 1 < panel_count(m) ? panel_first(q + 1, m) : padded_rows(m);
  }
  int64_t transposed_size(int64_t m) const { return padded_rows(m) * (k_ + k_tail_); }

  // Panels [begin, end) of A^T for A's m rows, A's row r at a + r lda, joined along k by its tail
  // at a_tail + r lda_tail.
  void transpose(int64_t begin, int64_t end, int64_t m, const S* a, int64_t lda, const S* a_tail, int64_t lda_tail,
                 S* at) const {
    constexpr int64_t kBlock = 64;  // values of k per pass over a panel's rows: kBlock x width in L1
    const int64_t k = k_ + k_tail_;
    for (int64_t q = begin; q < end; ++q) {
      const int64_t first = panel_first(q, m), width = panel_end(q, m) - first;
      S* panel = at + first * k;
      for (int64_t i0 = 0; i0 < k; i0 += kBlock) {
        const int64_t i1 = std::min(k, i0 + kBlock);
        for (int64_t r = 0; r < width; ++r) {
          const int64_t row = first + r;
          for (int64_t i = i0; i < i1; ++i)
            panel[i * width + r] = row >= m ? S(0) : i < k_ ? a[row * lda + i] : a_tail[row * lda_tail + i - k_];
        }
      }
    }
  }

  // Rows [0, m) of C for block p's columns, from A^T (transpose's, for the same m): kRangePanels
  // panels of rows at a time, each over the block's part of W.
  void block(int64_t p, int64_t m, const S* at, S beta, S* c, int64_t ldc, const S* bias = nullptr) const {
    const int64_t first = unit(p, 0), lanes = valid_lanes(p, 0), panels = panel_count(m);
    const S* head[kMaxGates * kWidth];  // block p's rows of W; rows past `lanes` repeat the last
    const S* tail[kMaxGates * kWidth];
    for (int64_t g = 0; g < gates_; ++g)
      for (int64_t l = 0; l < kWidth; ++l) {
        const int64_t row = g * units_ + first + std::min(l, lanes - 1);
        head[g * kWidth + l] = w_ + row * k_;
        tail[g * kWidth + l] = w_tail_ + row * k_tail_;
      }
    S sums[kMaxGates * kWidth * kRangeRows];  // C^T for the block's columns and a range of rows
    for (int64_t q0 = 0; q0 < panels; q0 += kRangePanels) {
      const int64_t q1 = std::min(panels, q0 + kRangePanels);
      const int64_t r0 = panel_first(q0, m), padded = panel_end(q1 - 1, m) - r0, rows = std::min(m - r0, padded);
      start_sums(p, r0, rows, padded, beta, c, ldc, bias, sums);
      add_products(head, 0, k_, m, q0, q1, at, sums);
      if (k_tail_ > 0) add_products(tail, k_, k_tail_, m, q0, q1, at, sums);
      store_sums(p, r0, rows, sums, c, ldc);
    }
  }

 private:
  static constexpr int64_t kMaxGates = 4;
  // Panels of rows per pass over the block's part of W (C^T for them in `sums`), and values of k
  // per pass over a panel: its part of A^T (24 KiB of floats with AVX2) then stays in L1 while the
  // block's rows of W take their part of k from L2, each row's part of k read once from memory.
  static constexpr int64_t kRangePanels = 4, kRangeRows = kRangePanels * 3 * kWidth;
  static constexpr int64_t kChunk = 1024 / sizeof(S);

  // sums (C^T for block p's columns and rows [r0, r0 + rows), rows kRangeRows apart) = beta C +
  // bias, and 0 for rows [rows, padded). In kWidth x kWidth tiles transposed from C where whole.
  void start_sums(int64_t p, int64_t r0, int64_t rows, int64_t padded, S beta, const S* c, int64_t ldc,
                  const S* bias, S* sums) const {
    const int64_t first = unit(p, 0), lanes = valid_lanes(p, 0);
    for (int64_t g = 0; g < gates_; ++g) {
      const int64_t col = g * units_ + first;
      S* out = sums + g * kWidth * kRangeRows;
      if (beta == S(0)) {
        for (int64_t l = 0; l < kWidth; ++l)
          std::fill_n(out + l * kRangeRows, padded, l < lanes && bias != nullptr ? bias[col + l] : S(0));
        continue;
      }
      int64_t r = 0;
      if (lanes == kWidth) {
        for (; r + kWidth <= rows; r += kWidth) {
          at::vec::transpose_mxn<S, kWidth, kWidth>(c + (r0 + r) * ldc + col, ldc, out + r, kRangeRows);
          for (int64_t l = 0; l < kWidth; ++l) {
            const V start(bias != nullptr ? bias[col + l] : S(0));
            S* sum = out + l * kRangeRows + r;
            at::vec::fmadd(V::loadu(sum), V(beta), start).store(sum);
          }
        }
      }
      for (; r < padded; ++r)
        for (int64_t l = 0; l < kWidth; ++l) {
          const S start = l < lanes && bias != nullptr ? bias[col + l] : S(0);
          out[l * kRangeRows + r] = l < lanes && r < rows ? std::fma(c[(r0 + r) * ldc + col + l], beta, start) : start;
        }
    }
  }

  // C's rows [r0, r0 + rows) for block p's columns = sums, as start_sums laid them out.
  void store_sums(int64_t p, int64_t r0, int64_t rows, const S* sums, S* c, int64_t ldc) const {
    const int64_t first = unit(p, 0), lanes = valid_lanes(p, 0);
    for (int64_t g = 0; g < gates_; ++g) {
      const int64_t col = g * units_ + first;
      const S* in = sums + g * kWidth * kRangeRows;
      int64_t r = 0;
      if (lanes == kWidth)
        for (; r + kWidth <= rows; r += kWidth)
          at::vec::transpose_mxn<S, kWidth, kWidth>(in + r, kRangeRows, c + (r0 + r) * ldc + col, ldc);
      for (; r < rows; ++r)
        for (int64_t l = 0; l < lanes; ++l) c[(r0 + r) * ldc + col + l] = in[l * kRangeRows + r];
    }
  }

  // sums (C^T for panels [q0, q1), rows kRangeRows apart) += W A^T over k values [k0, k0 + k) of
  // A^T, for the rows of W at w[i] (each at the same offset into k as A^T's, less k0).
  void add_products(const S* const (&w)[kMaxGates * kWidth], int64_t k0, int64_t k, int64_t m, int64_t q0,
                    int64_t q1, const S* at, S* sums) const {
    const int64_t k_all = k_ + k_tail_, n = gates_ * kWidth, r0 = panel_first(q0, m);
    for (int64_t i0 = 0; i0 < k; i0 += kChunk) {
      const int64_t chunk = std::min(kChunk, k - i0);
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t first = panel_first(q, m), width = panel_end(q, m) - first;
        const S* panel = at + first * k_all + (k0 + i0) * width;
        for (int64_t j = 0; j < n;) {  // rows of W: by 4 beside 3 vectors of A^T, else by 6 where n allows
          const int64_t rest = n - j;
          const int rows_of_w = width == 3 * kWidth || rest == 8 || rest == 4 ? 4 : rest >= 6 ? 6 : 2;
          const S* w_rows[6];
          for (int i = 0; i < rows_of_w; ++i) w_rows[i] = w[j + i] + i0;
          S* out = sums + j * kRangeRows + first - r0;
          if (width == 3 * kWidth) products<3, 4>(w_rows, chunk, panel, out);
          else if (width == 2 * kWidth) products_by<2>(rows_of_w, w_rows, chunk, panel, out);
          else products_by<1>(rows_of_w, w_rows, chunk, panel, out);
          j += rows_of_w;
        }
      }
    }
  }

  template <int NV>
  static void products_by(int rows_of_w, const S* const (&w)[6], int64_t k, const S* panel, S* out) {
    if (rows_of_w == 6) products<NV, 6>(w, k, panel, out);
    else if (rows_of_w == 4) products<NV, 4>(w, k, panel, out);
    else products<NV, 2>(w, k, panel, out);
  }

  // out[c][v] (rows kRangeRows apart) += sum over i < k of w[c][i] * panel[i][v], for R rows of W
  // and a panel of NV vectors of rows.
  template <int NV, int R>
  static void products(const S* const (&w)[6], int64_t k, const S* panel, S* out) {
    V acc[R][NV];
#pragma GCC unroll 6
    for (int c = 0; c < R; ++c)
#pragma GCC unroll 3
      for (int v = 0; v < NV; ++v) acc[c][v] = V::loadu(out + c * kRangeRows + v * kWidth);
    for (int64_t i = 0; i < k; ++i) {
      V x[NV];
#pragma GCC unroll 3
      for (int v = 0; v < NV; ++v) x[v] = V::loadu(panel + (i * NV + v) * kWidth);
#pragma GCC unroll 6
      for (int c = 0; c < R; ++c) {
        const V weight(w[c][i]);
#pragma GCC unroll 3
        for (int v = 0; v < NV; ++v) acc[c][v] = at::vec::fmadd(x[v], weight, acc[c][v]);
      }
    }
#pragma GCC unroll 6
    for (int c = 0; c < R; ++c)
#pragma GCC unroll 3
      for (int v = 0; v < NV; ++v) acc[c][v].store(out + c * kRangeRows + v * kWidth);
  }
};

// C = A W + beta C, W [k, n], a row at a time: blocks of kBlockVectors vectors of C's columns, a
// thread taking a contiguous range of them (see combine). Each value is beta C + the products in
// order of k, as the panels' kernel adds them. With E bfloat16 (S float; the AVX-512 and AVX2
// builds), W and A's rows are bfloat16 (A's padded with a 0 after an odd k), and each product of a
// pair of k is summed in float32 by the AVX512-BF16 instruction (AVX2: by FMAs on the pair
// widened), as the bfloat16 panels multiply.
template <typename S, typename E = S>
class RowCombinations {
 public:
  using V = at::vec::Vectorized<S>;
  static constexpr int64_t kWidth = V::size();
  static constexpr int64_t kBlockVectors = 4;

  RowCombinations() = default;
  RowCombinations(const E* w, int64_t k, int64_t n)
      : w_(w), k_(k), n_(n), count_((n + kBlockVectors * kWidth - 1) / (kBlockVectors * kWidth)) {}

  bool defined() const { return w_ != nullptr; }
  int64_t count() const { return count_; }
  // The columns (a cell's units) of block p, as Panels names them.
  int64_t unit_vectors() const { return kBlockVectors; }
  int64_t unit(int64_t p, int64_t v) const { return (p * kBlockVectors + v) * kWidth; }
  int64_t valid_lanes(int64_t p, int64_t v) const { return std::clamp<int64_t>(n_ - unit(p, v), 0, kWidth); }
  // Multiply-adds in one row of one block.
  int64_t row_work() const { return kBlockVectors * kWidth * k_; }
  // Values of A's row that combine() reads: k, padded to pairs in bfloat16.
  int64_t padded_k() const { return std::is_same_v<E, S> ? k_ : k_ + k_ % 2; }

  // C's row at c, the columns of blocks [begin, end): c = a W + beta c (a: one row of k values).
  // W's rows are read in order, each over the blocks' columns, kRows at a time: a thread streams
  // through its columns of W while that part of C's row stays in L1.
  void combine(int64_t begin, int64_t end, const E* a, S beta, S* c) const {
    const int64_t col_begin = unit(begin, 0), col_end = std::min(n_, unit(end, 0));
    if constexpr (!std::is_same_v<E, S>) {
      // Strips of up to kStripGroups groups of 32 columns, their sums kept in registers over all k.
      constexpr int64_t kStrip = kStripGroups * 2 * kWidth;
      for (int64_t col = col_begin; col < col_end; col += kStrip) {
        const int64_t cols = std::min(kStrip, col_end - col);
        if (cols > 64) pair_strip<4>(w_ + col, k_, n_, a, cols, beta, c + col);
        else if (cols > 32) pair_strip<2>(w_ + col, k_, n_, a, cols, beta, c + col);
        else pair_strip<1>(w_ + col, k_, n_, a, cols, beta, c + col);
      }
    } else {
      for (int64_t col = col_begin; col < col_end; col += kWidth) {
        const int count = static_cast<int>(std::min(kWidth, col_end - col));
        const V start = beta == S(0) ? V(S(0)) : at::vec::fmadd(V::loadu(c + col, count), V(beta), V(S(0)));
        start.store(c + col, count);
      }
      int64_t i = 0;
      for (; i + kRows <= k_; i += kRows) add_rows<kRows>(i, a, c, col_begin, col_end);
      for (; i < k_; ++i) add_rows<1>(i, a, c, col_begin, col_end);
    }
  }

 private:
  static constexpr int kRows = 8;
  // 4 groups: 8 independent sums, enough to cover the dot-product instruction's latency.
  static constexpr int kStripGroups = 4;

  // c[0, cols) = a W[:, 0, cols) + beta c, W's rows n apart from w, in bfloat16 (cols <= 32 G).
  // Two rows of W at a time: their vectors interleaved (unpacklo / unpackhi of 16-bit values) give
  // each 32-bit lane a pair of k for one column, which the dot-product instruction multiplies by
  // A's pair for those rows. Within each 128-bit lane, unpacklo takes columns 0-3 and unpackhi
  // 4-7 of that lane's 8, so a group of 32 columns sums into two vectors in that order, put back
  // in column order at the end.
  // Out of line: its 2 G accumulators and masks stay apart from the caller's loop over the strips.
  template <int G>
  static __attribute__((noinline)) void pair_strip(const E* w, int64_t k, int64_t n, const E* a, int64_t cols, S beta,
                                                   S* c) {
#if defined(CPU_CAPABILITY_AVX512)
    static_assert(std::is_same_v<S, float> && sizeof(E) == 2 && kWidth == 16, "bfloat16 rows sum in float32");
    __m512 lo[G], hi[G];
    __mmask32 mask[G];
    __mmask16 half_mask[G][2];
    // lo's lane 4L + q holds column 8L + q of the group's 32 (q < 4), hi's column 8L + 4 + q (see
    // below); in _mm512_permutex2var_ps's indices, the second vector's lanes count from 16.
    const __m512i lo_columns = _mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27);
    const __m512i hi_columns = _mm512_setr_epi32(4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) {
      const int64_t lanes = std::clamp<int64_t>(cols - 32 * g, 0, 32);
      mask[g] = static_cast<__mmask32>((uint64_t(1) << lanes) - 1);
      for (int h = 0; h < 2; ++h)
        half_mask[g][h] = static_cast<__mmask16>((1u << std::clamp<int64_t>(lanes - 16 * h, 0, 16)) - 1);
      // The sums start from beta c, as the panels' kernel starts them.
      lo[g] = hi[g] = _mm512_setzero_ps();
      if (beta != S(0)) {
        const __m512 scale = _mm512_set1_ps(beta);
        const __m512 first = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(half_mask[g][0], c + 32 * g), scale, lo[g]);
        const __m512 second = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(half_mask[g][1], c + 32 * g + 16), scale, lo[g]);
        lo[g] = _mm512_permutex2var_ps(first, lo_columns, second);
        hi[g] = _mm512_permutex2var_ps(first, hi_columns, second);
      }
    }
    // Rows i and i + 1 (an odd k's last row: with a row of zeros, as a's value after it is 0).
    for (int64_t i = 0; i < k; i += 2) {
      const E* even_row = w + i * n;
      const E* odd_row = i + 1 < k ? even_row + n : even_row;
      int32_t pair_bits;
      std::memcpy(&pair_bits, a + i, sizeof(pair_bits));
      const __m512i pair = _mm512_set1_epi32(pair_bits);
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) {
        const __m512i even = _mm512_maskz_loadu_epi16(mask[g], even_row + 32 * g);
        const __m512i odd = _mm512_maskz_loadu_epi16(i + 1 < k ? mask[g] : 0, odd_row + 32 * g);
        lo[g] = dot_bf16_pairs(lo[g], _mm512_unpacklo_epi16(even, odd), pair);
        hi[g] = dot_bf16_pairs(hi[g], _mm512_unpackhi_epi16(even, odd), pair);
      }
    }
    // Back in column order: column q of lane L's 8 from lo's lane 4L + q (q < 4), else hi's 4L + q - 4.
    const __m512i first_half = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i second_half = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) {
      _mm512_mask_storeu_ps(c + 32 * g, half_mask[g][0], _mm512_permutex2var_ps(lo[g], first_half, hi[g]));
      _mm512_mask_storeu_ps(c + 32 * g + 16, half_mask[g][1], _mm512_permutex2var_ps(lo[g], second_half, hi[g]));
    }
#elif defined(CPU_CAPABILITY_AVX2)
    // No dot-product instruction, so no interleaving: A's pair widened to two float32 values, each
    // row's 8 columns a vector widened (widened_bf16s), the even row's products added, then the
    // odd row's. A last vector of fewer than 8 columns reads its weights through a copy.
    static_assert(std::is_same_v<S, float> && sizeof(E) == 2 && kWidth == 8, "bfloat16 rows sum in float32");
    constexpr int kVectors = 4 * G;
    const int64_t full = cols / kWidth, rest = cols % kWidth;
    alignas(32) int32_t rest_lanes[kWidth];
    for (int l = 0; l < kWidth; ++l) rest_lanes[l] = l < rest ? -1 : 0;
    const __m256i rest_mask = _mm256_load_si256(reinterpret_cast<const __m256i*>(rest_lanes));
    __m256 acc[kVectors];
#pragma GCC unroll 8
    for (int v = 0; v < kVectors; ++v) {
      acc[v] = _mm256_setzero_ps();
      if (beta == S(0)) continue;  // the sums start from beta c, as the panels' kernel starts them
      if (v < full) acc[v] = _mm256_mul_ps(_mm256_loadu_ps(c + v * kWidth), _mm256_set1_ps(beta));
      else if (v == full && rest > 0) acc[v] = _mm256_mul_ps(_mm256_maskload_ps(c + v * kWidth, rest_mask), _mm256_set1_ps(beta));
    }
    E rest_weights[2][kWidth] = {};  // the last vector's weights of the two rows, zero past `rest`
    for (int64_t i = 0; i < k; i += 2) {
      const E* even_row = w + i * n;
      const bool odd = i + 1 < k;  // (else A's value after the last k is 0, and the row is skipped)
      int32_t pair_bits;
      std::memcpy(&pair_bits, a + i, sizeof(pair_bits));
      const __m256i pair = _mm256_set1_epi32(pair_bits);
      const __m256 a_even = even_bf16s(pair), a_odd = odd_bf16s(pair);
#pragma GCC unroll 8
      for (int v = 0; v < kVectors; ++v) {
        if (v > full || (v == full && rest == 0)) break;
        const E* even_weights = even_row + v * kWidth;
        const E* odd_weights = even_weights + n;
        if (v == full) {
          std::copy_n(even_weights, rest, rest_weights[0]);
          if (odd) std::copy_n(odd_weights, rest, rest_weights[1]);
          even_weights = rest_weights[0], odd_weights = rest_weights[1];
        }
        acc[v] = _mm256_fmadd_ps(a_even, widened_bf16s(even_weights), acc[v]);
        if (odd) acc[v] = _mm256_fmadd_ps(a_odd, widened_bf16s(odd_weights), acc[v]);
      }
    }
#pragma GCC unroll 8
    for (int v = 0; v < kVectors; ++v) {
      if (v < full) _mm256_storeu_ps(c + v * kWidth, acc[v]);
      else if (v == full && rest > 0) _mm256_maskstore_ps(c + v * kWidth, rest_mask, acc[v]);
    }
#else
    (void)w, (void)k, (void)n, (void)a, (void)cols, (void)beta, (void)c;
    TORCH_INTERNAL_ASSERT(false, "bfloat16 row combinations need the AVX-512 or AVX2 build");
#endif
  }

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

  const E* w_ = nullptr;
  int64_t k_ = 0, n_ = 0, count_ = 0;
};

}  // namespace fused_rnn
