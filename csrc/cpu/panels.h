// The per-step GEMM of the CPU backend, C[m, n] = A[m, k] B + beta C, on a right operand B
// re-laid out once per call into panels of SIMD vectors (or, for a product made once, a panel at a
// time as it is used), and a register-blocked at::vec micro-kernel over them. A panel holds NV (2
// to 4) vectors of columns for every k, so one pass over it keeps MR x NV accumulators in registers
// and reads each weight once per MR rows.
//
// The columns of B form `gates` groups of `units` columns each (column g * units + u, as the
// gates of a recurrent cell sit in W_hh); panel p holds, for every gate, the same block of
// units [p * U, (p + 1) * U). A cell's pointwise step for those units can therefore follow the
// GEMM of their panel directly, while the gate values are still in L1. A plain matrix is one
// gate of n units. The threads take contiguous ranges of panels, so at every step each core
// reads the same part of the weight, which stays in its own L2.
//
// Panels<float, c10::BFloat16> (AVX-512 build, for CPUs with AVX512-BF16; AVX2 build) holds the
// weights in bfloat16 and reads A in bfloat16: each 32-bit lane of a panel vector holds the weights
// of two consecutive k, and the dot-product instruction adds both products to a float32
// accumulator (twice the multiply-adds of a float32 FMA per instruction; the AVX2 build widens
// each lane into two float32 values and adds their products by FMAs). The products of two bfloat16
// values are exact in float32, so the result is that of float32 arithmetic on the rounded operands.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "bf16_instructions.h"
#include "caches.h"
#include "scratch.h"

#if defined(CPU_CAPABILITY_AVX512)
#include <ATen/Context.h>
#include <ATen/cpu/Utils.h>
#include <ATen/native/CPUBlas.h>
#endif

namespace fused_rnn {

// set_amx_products (fused_rnn._cpu), first from FUSED_RNN_AMX: -1 as detected, 0 never (FUSED_RNN_AMX=0:
// the AVX512-BF16 kernel instead).
inline std::atomic<int> amx_override{[] {
  const char* value = std::getenv("FUSED_RNN_AMX");
  return value != nullptr && std::strcmp(value, "0") == 0 ? 0 : -1;
}()};

// Whether this thread's AMX tiles are configured by a block since release_amx_tiles last ran.
inline thread_local bool amx_tiles_in_use = false;

// Releases this thread's AMX tiles where a block configured them: each thread's share of a
// product does so at its end (as ATen's own callers of brgemm do), not each block (where the next
// block's call configures them again: 0.8 us a block of 16 x 64 x 512, 1 us of work).
inline void release_amx_tiles() {
#if defined(CPU_CAPABILITY_AVX512)
  if (amx_tiles_in_use) at::native::cpublas::brgemm_release(true), amx_tiles_in_use = false;
#endif
}

// Whether bfloat16 panels multiply on AMX tiles (Intel Sapphire Rapids on): the CPU has AMX-BF16,
// the OS lets this process use it (at::cpu::init_amx) and ATen's oneDNN micro-kernel (cpublas::
// brgemm) runs bfloat16 on it, which it refuses while oneDNN is disabled
// (torch.backends.mkldnn.flags(enabled=False)): that is asked at every layout. One tile
// instruction does 16 x 16 x 32 multiply-adds, and a step's products run 4-10x as fast as on
// AVX512-BF16's dot-product instruction, which on these CPUs does no more multiply-adds a cycle
// than float32 FMAs (Xeon guest, 2 threads, T=100 bfloat16 LSTM inference, ms: B=64 I=H=512
// 160.6 on it where torch.nn's oneDNN, on AMX, takes 24.5).
inline bool amx_bf16_products() {
#if defined(CPU_CAPABILITY_AVX512)
  static const bool available = [] {
    const auto capabilities = at::cpu::get_cpu_capabilities();
    const auto amx = capabilities.find("amx_bf16");
    return amx != capabilities.end() && amx->second.isBool() && amx->second.toBool() && at::cpu::init_amx();
  }();
  return available && amx_override.load(std::memory_order_relaxed) != 0 &&
         at::globalContext().userEnabledMkldnn() && at::native::cpublas::could_pack(at::kBFloat16);
#else
  return false;
#endif
}

#if defined(CPU_CAPABILITY_AVX512)
// n float32 values rounded to bfloat16 (round_vector_to_bf16), as operands of bfloat16 panels
// only: one instruction for 16 values where at::vec's integer rounding takes about ten (the steps'
// serial rounding of h_prev: LSTM B=64 H=256 inference, 4% of the time).
inline void round_to_bf16(const float* src, c10::BFloat16* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), round_vector_to_bf16(_mm512_loadu_ps(src + i)));
  if (i < n) {
    const __mmask16 lanes = static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm256_mask_storeu_epi16(dst + i, lanes, round_vector_to_bf16(_mm512_maskz_loadu_ps(lanes, src + i)));
  }
}
#elif defined(CPU_CAPABILITY_AVX2)
// The same in the AVX2 build, 8 values at a time with at::vec's rounding (denormals kept):
// at::vec::convert rounds 16 at a time and the rest one by one, and the pointwise passes round
// a vector of 8 units at a time (RNN T=100 B=64 I=H=256 inference: 12% of the call).
inline void round_to_bf16(const float* src, c10::BFloat16* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), at::vec::cvtfp32_bf16(_mm256_loadu_ps(src + i)));
  for (; i < n; ++i) dst[i] = c10::BFloat16(src[i]);
}
#else  // (no bfloat16 panels here; at::vec's rounding, denormals kept)
inline void round_to_bf16(const float* src, c10::BFloat16* dst, int64_t n) { at::vec::convert(src, dst, n); }
#endif

template <typename S, typename E = S>
class Panels {
 public:
  using V = at::vec::Vectorized<S>;
  // Values of k per lane of a panel vector, E the type of the weights and of A: 2 in bfloat16.
  static constexpr int64_t kPack = std::is_same_v<E, c10::BFloat16> ? 2 : 1;
  static constexpr int64_t kWidth = V::size();
  static constexpr int64_t kRegisters = sizeof(V) >= 64 ? 32 : 16;  // zmm with AVX-512, else ymm/xmm
  // Vectors of accumulators per row in one pass of the micro-kernel: 4 (x 6 rows) in 32 registers,
  // 2 (x 6 rows) in 16, where an LSTM panel (4 vectors, one per gate) takes two passes over k
  // instead of one with 2 rows (measured, AVX2: LSTM inference 15-20% faster; GRU's 3 vectors stay
  // one pass of 4 rows, 4-10% faster than 2 + 1). A plain matrix's panels are one pass wide.
  static constexpr int64_t kPassVectors = kRegisters == 32 ? 4 : 2;

  Panels() = default;

  // B = op(w): w is row-major [n, k] when `trans` (B = w^T, as W_hh in h W_hh^T), else [k, n].
  // With `w_tail` (trans only), B^T = [w, w_tail] joined along k: w is [n, k - k_tail] and
  // w_tail [n, k_tail]. The layout goes into the backend's scratch buffer `slot`. With kPack 2,
  // the head's k and the tail's are each padded to even (padded_k(): where A's tail starts). The
  // weights are in S, or already in E (bfloat16 weights, laid out as they are).
  template <typename W>
  Panels(const W* w, bool trans, int64_t k, int64_t gates, int64_t units, Scratch slot, const W* w_tail = nullptr,
         int64_t k_tail = 0)
      : Panels(k, gates, units, k_tail) {
    static_assert(std::is_same_v<W, S> || std::is_same_v<W, E>, "weights in S or in the panels' type");
    data_ = cpu_scratch(slot, {count_ * panel_size()}, at::TensorOptions().dtype(c10::CppTypeToScalarType<E>::value));
    base_ = data_.data_ptr<E>();
    streams_ = 4 * bytes() > cache_sizes().last_level();
    at::parallel_for(0, count_, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) lay_out(base_ + p * panel_size(), p, w, trans, w_tail);
    });
  }

  // The same panels of a plain matrix (one gate), each laid out only as multiply() reaches it, into
  // a buffer of the thread that multiplies it (in L2), and multiplied there by all of A's rows: for
  // a product made once, the same layout work without a copy of the whole weight, and no panel read
  // back from memory. w must outlive the panels, which are multiplied through multiply() only
  // (block() reads panels laid out at once). The weight is in S, or in E where it has it (bfloat16
  // weights).
  struct LaidOutOnUse {};
  template <typename W>
  Panels(LaidOutOnUse, const W* w, bool trans, int64_t k, int64_t units) : Panels(k, 1, units, 0) {
    static_assert(std::is_same_v<W, S> || std::is_same_v<W, E>, "weights in S or in the panels' type");
    if constexpr (std::is_same_v<W, S>) source_ = w;
    else stored_source_ = w;
    source_trans_ = trans;
  }

  bool defined() const { return data_.defined() || source_ != nullptr || stored_source_ != nullptr; }
  bool amx() const { return amx_; }
  // Rows of a block on AMX tiles: four rows of tiles.
  static constexpr int64_t kAmxRows = 64;
  int64_t count() const { return count_; }
  // Bytes of all the panels laid out (whether or not they are, at once).
  int64_t bytes() const { return count_ * panel_size() * static_cast<int64_t>(sizeof(E)); }
  int64_t k() const { return k_; }
  // Columns of A a row spans: k, with kPack 2 the head and tail each padded to even.
  int64_t padded_k() const { return (head_packs_ + tail_packs_) * kPack; }
  int64_t padded_head() const { return head_packs_ * kPack; }
  int64_t vectors() const { return vectors_; }
  int64_t unit_vectors() const { return unit_vectors_; }
  // Vectors per pass of the micro-kernel over this panel, and rows per register block.
  int64_t pass_vectors() const { return vectors_ % kPassVectors == 0 ? kPassVectors : vectors_; }
  int64_t block_rows() const {
    if (amx_) return kAmxRows;
    const int64_t pass = pass_vectors();
    return pass == 2 ? block_rows_for<2>() : pass == 3 ? block_rows_for<3>() : block_rows_for<4>();
  }
  // First unit of vector v of panel p, and its first column of C.
  int64_t unit(int64_t p, int64_t v) const { return (p * unit_vectors_ + v % unit_vectors_) * kWidth; }
  int64_t column(int64_t p, int64_t v) const { return (v / unit_vectors_) * units_ + unit(p, v); }
  int64_t valid_lanes(int64_t p, int64_t v) const {
    return std::clamp<int64_t>(units_ - unit(p, v), 0, kWidth);
  }

  // Panel rows: values of k, pairs of k with kPack 2.
  int64_t panel_rows() const { return head_packs_ + tail_packs_; }

  // A range of panel rows [begin, end) for block() to multiply (see sweep_rows()), and the share
  // of the next range (the next panel's, after a whole panel) its block prefetches where the
  // panels stream from memory: the blocks of the pass's full register rows split it between them,
  // each spreading its share over its own sweep, so that the weight streams in at an even pace
  // while they multiply (AVX2, LSTM I=16 H=2048 inference, 20 steps: B=16 154 -> 136 ms, B=64 T=10
  // 173 -> 153 ms, from the first block fetching all of the next panel). shares 0: none.
  struct Sweep {
    int64_t begin, end;
    int64_t share, shares;  // this block prefetches part `share` of `shares` of the next range
    // Whether the products are added to C as an earlier range of k left it, from panel row 0 of a
    // buffer holding only this range (panels laid out on use a block of k at a time); else as
    // begin > 0 says.
    bool continues = false;
    // (Passed by reference: built a field at a time for every block, a copy into a call's
    // arguments read it back in wider loads than those stores, which stalled on forwarding: perf
    // sampling put 2.5% of a bfloat16 LSTM inference call, B=32 I=H=256, on those two loads.)
  };

  // Where a block prefetches: the next panel row's vectors at `at`, one row every `every` rows it
  // multiplies (counting down in `countdown`).
  struct Prefetch {
    const E* at;
    int64_t every, countdown;
  };

  // Panel rows per sweep of an m-row product's blocks of rows through a panel. Every block reads
  // the whole panel, and the next panel the same rows of A. While the panel, the next one (which
  // streaming panels prefetch meanwhile) and A's m rows fit in L2 together, a sweep covers the
  // panel. Beyond, the blocks would read the panel back from L3 or memory: they sweep a range of
  // rows at a time instead, whose parts of the panel and of A, about a quarter of L2, stay in it
  // while every block reads them (AVX2, 512 KiB L2, LSTM I=16 H=2048 B=16 inference 128 -> 98 ms
  // for 20 steps, training 161 -> 140 ms for 10; the backward's panels hold 4 H values of k).
  // Each sum still adds the same products in the same order.
  int64_t sweep_rows(int64_t m) const {
    const int64_t rows = panel_rows(), l2 = cache_sizes().l2;
    if (amx_) return rows;  // (the micro-kernel blocks k itself)
    const int64_t panel_row_bytes = vectors_ * kWidth * kPack * static_cast<int64_t>(sizeof(E));
    const int64_t row_bytes = panel_row_bytes + m * kPack * static_cast<int64_t>(sizeof(E));
    if (m <= block_rows() || rows * (panel_row_bytes + row_bytes) <= l2) return rows;
    const int64_t sweeps = (4 * rows * row_bytes + l2 - 1) / l2;
    return std::min(rows, ((rows + sweeps - 1) / sweeps + 15) / 16 * 16);
  }

  // Rows [0, rows) (rows <= block_rows()) of C for panel p's columns; `bias` (length n, may be
  // null) is added to every row. A's element (r, i) is a[r * lda + i * lda_k]; for panels laid
  // out with a w_tail, A is joined the same way: its last k_tail columns are a_tail[r * lda_tail + i].
  // With kPack 2, A is read a pair of k at a time: lda_k must be 1 and each of A's parts padded to
  // even with zeros. With a `sweep` of rows after the first, the products are added to C as the
  // earlier ranges left it (beta and bias were applied with the first).
  void block(int64_t p, int64_t rows, const E* a, int64_t lda, int64_t lda_k, S beta, S* c, int64_t ldc,
             const S* bias, const E* a_tail, int64_t lda_tail, const Sweep& sweep) const {
    block_in(base_ + p * panel_size(), p, rows, a, lda, lda_k, beta, c, ldc, bias, a_tail, lda_tail, sweep);
  }

  // C[m, n] = A[m, k] B + beta C (+ bias), over every panel and block of rows; A's element (r, i)
  // is a[r * lda + i * lda_k] (lda_k = 1: row-major; lda = 1: A is a transposed row-major matrix).
  void multiply(int64_t m, const E* a, int64_t lda, int64_t lda_k, S beta, S* c, int64_t ldc,
                const S* bias = nullptr) const;

  // Multiply-adds in one block of rows of one panel.
  int64_t block_work() const { return block_rows() * k_ * vectors_ * kWidth; }

 private:
  void multiply_on_use_by_blocks(int64_t m, const E* a, int64_t lda, int64_t lda_k, S beta, S* c, int64_t ldc,
                                 const S* bias) const;

  // block() on panel p laid out at `panel`.
  void block_in(const E* panel, int64_t p, int64_t rows, const E* a, int64_t lda, int64_t lda_k, S beta, S* c,
                int64_t ldc, const S* bias, const E* a_tail, int64_t lda_tail, const Sweep& sweep) const {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (kPack > 1) {
      if (amx_) return amx_block(panel, p, rows, a, lda, beta, c, ldc, bias, a_tail, lda_tail, sweep);
    }
#endif
    // Rows few enough for the accumulators of 4 vectors (with 16 registers: 2) take one pass of 4
    // where there would be two of 2: a sweep through the panel in order, with twice the independent
    // sums, instead of two sweeps each reading every other 64 bytes. A small batch's step is a
    // matrix-vector product bound by reading W_hh. (Each sum adds the same products in the same
    // order either way.)
    const int64_t pass = vectors_ % 4 == 0 && rows <= block_rows_for<4>() ? 4 : pass_vectors();
    for (int64_t first = 0; first < vectors_; first += pass) {
      if (pass == 2) dispatch_rows<2>(panel, p, first, rows, a, lda, lda_k, beta, c, ldc, bias, a_tail, lda_tail, sweep);
      else if (pass == 3) dispatch_rows<3>(panel, p, first, rows, a, lda, lda_k, beta, c, ldc, bias, a_tail, lda_tail, sweep);
      else dispatch_rows<4>(panel, p, first, rows, a, lda, lda_k, beta, c, ldc, bias, a_tail, lda_tail, sweep);
    }
  }

  Panels(int64_t k, int64_t gates, int64_t units, int64_t k_tail)
      : k_(k), k_tail_(k_tail), gates_(gates), units_(units), unit_vectors_(gates == 1 ? kPassVectors : 1),
        amx_(kPack > 1 && amx_bf16_products()) {
    vectors_ = gates_ * unit_vectors_;
    const int64_t unit_block = unit_vectors_ * kWidth;
    count_ = (units_ + unit_block - 1) / unit_block;
    head_packs_ = (k_ - k_tail_ + kPack - 1) / kPack;
    tail_packs_ = (k_tail_ + kPack - 1) / kPack;
  }

  int64_t panel_size() const { return panel_rows() * vectors_ * kWidth * kPack; }

  template <typename W>
  void lay_out(E* panel, int64_t p, const W* w, bool trans, const W* w_tail) const {
    if constexpr (kPack > 1) pack_panel(panel, p, w, trans, gates_ * units_, w_tail);
    else lay_out_panel(panel, p, w, trans, gates_ * units_, w_tail);
  }

#if defined(CPU_CAPABILITY_AVX512)
  // block() on AMX tiles: the products of the panel's whole width (at most 4 vectors) for `rows`
  // rows by oneDNN's micro-kernel, whose bfloat16 B ([k / 2][n][2]) is the panel as laid out, the
  // head's k and the tail's in one call where A holds them side by side (the steps' rounded h_prev
  // and x_t), else in two, into a buffer; then each vector's valid lanes into C with beta C and
  // the bias, as kernel() adds them. Each sum is float32 arithmetic on the same bfloat16 operands
  // as the AVX512-BF16 kernel's, in another order. (Tiles: release_amx_tiles.)
  void amx_block(const E* panel, int64_t p, int64_t rows, const E* a, int64_t lda, S beta, S* c, int64_t ldc,
                 const S* bias, const E* a_tail, int64_t lda_tail, const Sweep& sweep) const {
    constexpr int64_t kMaxWidth = 4 * kWidth;
    const int64_t width = vectors_ * kWidth;
    TORCH_INTERNAL_ASSERT(rows <= kAmxRows && width <= kMaxWidth, "fused_rnn: an AMX block of ", rows, " x ", width);
    alignas(64) float sums[kAmxRows * kMaxWidth];
    const int64_t begin = sweep.begin, end = std::min(sweep.end, panel_rows());
    const int64_t head_end = std::min(end, head_packs_), tail_begin = std::max(begin, head_packs_);
    bool summed = false;  // whether `sums` holds products yet
    const auto add_products = [&](const E* a_part, int64_t ld, int64_t first, int64_t last) {
      at::native::cpublas::brgemm(rows, width, (last - first) * kPack, ld, width, width, summed, a_part,
                                  panel + first * width * kPack, sums, true);
      summed = true;
    };
    const bool joined = a_tail == a + head_packs_ * kPack && lda_tail == lda;
    if (joined && begin < head_end && tail_begin < end) {
      add_products(a + begin * kPack, lda, begin, end);
    } else {
      if (begin < head_end) add_products(a + begin * kPack, lda, begin, head_end);
      if (tail_begin < end) add_products(a_tail + (tail_begin - head_packs_) * kPack, lda_tail, tail_begin, end);
    }
    amx_tiles_in_use = amx_tiles_in_use || summed;
    const bool continues = begin > 0 || sweep.continues;  // on from C, as a later range
    for (int64_t v = 0; v < vectors_; ++v) {
      const int64_t col = column(p, v), lanes = valid_lanes(p, v);
      if (lanes <= 0) continue;
      const V start = continues || bias == nullptr ? V(S(0)) : V::loadu(bias + col, lanes);
      for (int64_t r = 0; r < rows; ++r) {
        S* out = c + r * ldc + col;
        V sum = summed ? V::loadu(sums + r * width + v * kWidth, lanes) : V(S(0));
        if (continues) sum = sum + V::loadu(out, lanes);
        else if (beta != S(0)) sum = sum + at::vec::fmadd(V::loadu(out, lanes), V(beta), start);
        else sum = sum + start;
        sum.store(out, lanes);
      }
    }
  }
#endif

  // Rows of a register block: R x NV sums, NV vectors of the panel and A's value in registers. The
  // AVX2 build's bfloat16 pairs, widened in registers (multiply_add_pairs), take 6 rows of 2
  // vectors, 3 of 3, 2 of 4: one row fewer at 3 vectors, whose 4 rows spilled the sums (AVX2 Zen
  // 4, micro-benchmark, GFLOP/s a core: 3 vectors 77-82 at 3 rows, 60 at 4, 64 at 2; float32
  // panels' 4 rows 85-89).
  template <int NV>
  static constexpr int64_t block_rows_for() {
    if constexpr (kPack > 1 && kRegisters == 16) return (kRegisters - 2 * NV) / NV;
    return std::min<int64_t>(8, (kRegisters - NV - 1) / NV);
  }

  // Panel p: [k][vectors][kWidth].
  void lay_out_panel(E* panel, int64_t p, const S* w, bool trans, int64_t n, const S* w_tail) const {
    const int64_t ld = vectors_ * kWidth;  // between consecutive k in a panel
    for (int64_t v = 0; v < vectors_; ++v) {
      const int64_t col = column(p, v), lanes = valid_lanes(p, v);
      E* dst = panel + v * kWidth;
      if (lanes > 0 && trans) {  // rows col.. of w (and w_tail), transposed into the panel's columns
        const int64_t k_head = k_ - k_tail_;
        at::vec::transpose_mxn<S>(w + col * k_head, k_head, dst, ld, static_cast<int>(lanes), static_cast<int>(k_head));
        if (k_tail_ > 0)
          at::vec::transpose_mxn<S>(w_tail + col * k_tail_, k_tail_, dst + k_head * ld, ld, static_cast<int>(lanes),
                                    static_cast<int>(k_tail_));
      } else if (lanes > 0) {
        for (int64_t i = 0; i < k_; ++i) std::copy_n(w + i * n + col, lanes, dst + i * ld);
      }
      if (lanes < kWidth)
        for (int64_t i = 0; i < k_; ++i) std::fill_n(dst + i * ld + lanes, kWidth - lanes, S(0));
    }
  }

  // Panel p in the kPack 2 layout: [k / 2][vectors][kWidth][2], each part of k padded with zeros.
  // Transposed (trans), a column's k values are a row of w (then of w_tail): each vector's rows
  // are rounded into a buffer, where a pair of k is one 32-bit value, and the buffer transposed
  // into the panel as a matrix of 32-bit values, 16 x 16 at a time (with single 4-byte stores,
  // the layout took 14% of a bfloat16 LSTM call at B=1 I=H=512 T=100). Else a pair is two rows of
  // w, interleaved a vector at a time (AVX-512; with single 2-byte stores the weight gradients'
  // layout of x and h_prev in every backward chunk cost bfloat16 training 1-4%, in-process A/B:
  // RNN B=64 I=H=64 1.04-1.07x, GRU B=16 1.04x, LSTM B=64 1.01-1.02x, GRU B=16 I=H=512 1.02x).
  template <typename W>
  void pack_panel(E* panel, int64_t p, const W* w, bool trans, int64_t n, const W* w_tail) const {
    const int64_t ld = vectors_ * kWidth * kPack, k_head = k_ - k_tail_;
    bool full = trans;  // whether the transposes write every value of the panel
    for (int64_t v = 0; v < vectors_; ++v) full = full && valid_lanes(p, v) == kWidth;
    if (!full) std::fill_n(panel, (head_packs_ + tail_packs_) * ld, E(0));
    if (trans) {
      std::vector<E> rounded(kWidth * kPack * std::max(head_packs_, tail_packs_));
      // Lanes [0, lanes) of vector v, panel rows [first, first + packs): columns col.. of src [n, k].
      const auto pack_part = [&](int64_t v, int64_t col, int64_t lanes, const W* src, int64_t k, int64_t packs,
                                 int64_t first) {
        for (int64_t lane = 0; lane < lanes; ++lane) {
          E* row = rounded.data() + lane * packs * kPack;
          to_pack_type(src + (col + lane) * k, row, k);
          if (k % kPack) row[k] = E(0);
        }
        static_assert(sizeof(E) * kPack == sizeof(float), "a pair of k moves as one 32-bit value");
        at::vec::transpose_mxn<float>(reinterpret_cast<const float*>(rounded.data()), packs,
                                      reinterpret_cast<float*>(panel + first * ld + v * kWidth * kPack), ld / kPack,
                                      static_cast<int>(lanes), static_cast<int>(packs));
      };
      for (int64_t v = 0; v < vectors_; ++v) {
        const int64_t col = column(p, v), lanes = valid_lanes(p, v);
        if (lanes <= 0) continue;
        pack_part(v, col, lanes, w, k_head, head_packs_, 0);
        if (k_tail_ > 0) pack_part(v, col, lanes, w_tail, k_tail_, tail_packs_, head_packs_);
      }
      return;
    }
    std::vector<E> rounded(2 * kWidth);
    for (int64_t v = 0; v < vectors_; ++v) {
      const int64_t col = column(p, v), lanes = valid_lanes(p, v);
      E* dst = panel + v * kWidth * kPack;
      for (int64_t i = 0; i < k_; i += kPack) {  // rows i and i + 1 of w, interleaved
        E* pairs = dst + (i / kPack) * ld;
        const E* even = rounded.data();
        const E* odd = even + kWidth;
        if constexpr (std::is_same_v<W, E>) {  // as stored
          even = w + i * n + col;
          odd = i + 1 < k_ ? even + n : nullptr;
        } else {
          at::vec::convert(w + i * n + col, rounded.data(), lanes);
          if (i + 1 < k_) at::vec::convert(w + (i + 1) * n + col, rounded.data() + kWidth, lanes);
          else odd = nullptr;
        }
#if defined(CPU_CAPABILITY_AVX512)
        if (lanes == kWidth) {  // each 32-bit lane: even's value in its low half, odd's in its high
          const __m512i low = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(even)));
          const __m512i high = odd == nullptr ? _mm512_setzero_si512()
                                              : _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(odd)));
          _mm512_storeu_si512(pairs, _mm512_or_si512(low, _mm512_slli_epi32(high, 16)));
          continue;
        }
#endif
        for (int64_t lane = 0; lane < lanes; ++lane)
          pairs[lane * kPack] = even[lane], pairs[lane * kPack + 1] = odd == nullptr ? E(0) : odd[lane];
      }
    }
  }

  // n weights in the panels' type (kPack 2: bfloat16): rounded from float32 a long row at a time,
  // or copied where they have it.
  template <typename W>
  static void to_pack_type(const W* src, E* dst, int64_t n) {
    static_assert(std::is_same_v<E, c10::BFloat16> && (std::is_same_v<W, E> || std::is_same_v<W, float>));
    if constexpr (std::is_same_v<W, E>) std::copy_n(src, n, dst);
    else round_to_bf16(src, dst, n);
  }

  template <int NV, int R = block_rows_for<NV>()>
  void dispatch_rows(const E* panel, int64_t p, int64_t first, int64_t rows, const E* a, int64_t lda, int64_t lda_k,
                     S beta, S* c, int64_t ldc, const S* bias, const E* a_tail, int64_t lda_tail,
                     const Sweep& sweep) const {
    if constexpr (R > 1) {
      if (rows < R)
        return dispatch_rows<NV, R - 1>(panel, p, first, rows, a, lda, lda_k, beta, c, ldc, bias, a_tail, lda_tail,
                                        sweep);
    }
    kernel<NV, R>(panel, p, first, a, lda, lda_k, beta, c, ldc, bias, a_tail, lda_tail, sweep);
  }

  // Asks for the cache lines of `bytes` bytes from p into L2 (a prefetch never faults).
  static inline __attribute__((always_inline)) void prefetch_to_l2(const void* p, int64_t bytes) {
    for (int64_t line = 0; line < bytes; line += 64) __builtin_prefetch(static_cast<const char*>(p) + line, 0, 2);
  }

  // acc[r][v] += sum over `count` values of k of A(r, i) times vector v of the pass at that k (the
  // panel's k rows are `stride` values apart). With kPrefetch, the pass's vectors of a panel row
  // are prefetched as `pf` says.
  template <int NV, int R, bool kPrefetch>
  static inline __attribute__((always_inline)) void multiply_add(V (&acc)[R][NV], const S* w, int64_t stride,
                                                                 const S* a, int64_t lda, int64_t lda_k,
                                                                 int64_t count, Prefetch& pf) {
    for (int64_t i = 0; i < count; ++i, w += stride, a += lda_k) {
      if constexpr (kPrefetch) {
        if (--pf.countdown == 0) prefetch_to_l2(pf.at, NV * kWidth * sizeof(S)), pf.at += stride, pf.countdown = pf.every;
      }
      V wv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) wv[v] = V::loadu(w + v * kWidth);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const V x(a[r * lda]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[r][v] = at::vec::fmadd(x, wv[v], acc[r][v]);
      }
    }
  }

  // The same for bfloat16 panels: `pairs` pairs of k, A's pair (r, i) at a[r * lda + 2 i].
  template <int NV, int R, bool kPrefetch>
  static inline __attribute__((always_inline)) void multiply_add_pairs(V (&acc)[R][NV], const E* w, int64_t stride,
                                                                       const E* a, int64_t lda, int64_t pairs,
                                                                       Prefetch& pf) {
    static_assert(std::is_same_v<S, float>, "bfloat16 panels accumulate in float32");
#if defined(CPU_CAPABILITY_AVX512)
    for (int64_t i = 0; i < pairs; ++i, w += stride, a += 2) {
      if constexpr (kPrefetch) {
        if (--pf.countdown == 0) prefetch_to_l2(pf.at, NV * kWidth * 2 * sizeof(E)), pf.at += stride, pf.countdown = pf.every;
      }
      __m512i wv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) wv[v] = _mm512_loadu_si512(w + v * kWidth * 2);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        int32_t pair;
        std::memcpy(&pair, a + r * lda, sizeof(pair));
        const __m512i x = _mm512_set1_epi32(pair);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[r][v] = V(dot_bf16_pairs(acc[r][v], x, wv[v]));
      }
    }
#elif defined(CPU_CAPABILITY_AVX2)
    // No dot-product instruction: each pair widened to float32 (even_bf16s, odd_bf16s_unmasked),
    // the even k's products added, then the odd k's; the weights' vectors are widened once for all
    // R rows, one half at a time (16 registers hold R x NV sums, NV weights and A's value). A's
    // pair is broadcast for each half on its own, as integers for the even k and as a float for
    // the odd: one broadcast shared by both halves kept R more registers live, which spilled the
    // sums at 5 and 6 rows (AVX2 Zen 4, micro-benchmark: 2 vectors x 6 rows 82-86 GFLOP/s a core,
    // float32 panels' 85-89).
    for (int64_t i = 0; i < pairs; ++i, w += stride, a += 2) {
      if constexpr (kPrefetch) {
        if (--pf.countdown == 0) prefetch_to_l2(pf.at, NV * kWidth * 2 * sizeof(E)), pf.at += stride, pf.countdown = pf.every;
      }
      const auto pairs_of = [](const E* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); };
      const auto even_of_pair = [](const E* p) {
        int32_t pair;
        std::memcpy(&pair, p, sizeof(pair));
        return even_bf16s(_mm256_set1_epi32(pair));
      };
      const auto odd_of_pair = [](const E* p) {
        float pair;
        std::memcpy(&pair, p, sizeof(pair));
        return odd_bf16s_unmasked(_mm256_castps_si256(_mm256_set1_ps(pair)));
      };
      // The products of one k of the pair: `half` takes its values from each lane of the weights'
      // pairs, `a_half` A's value from a pair.
      const auto add_products = [&](auto half, auto a_half) {
        __m256 wv[NV];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) wv[v] = half(pairs_of(w + v * kWidth * 2));
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          const __m256 x = a_half(a + r * lda);
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v) acc[r][v] = V(_mm256_fmadd_ps(x, wv[v], acc[r][v]));
        }
      };
      add_products([](__m256i pairs) { return even_bf16s(pairs); }, even_of_pair);
      add_products([](__m256i pairs) { return odd_bf16s_unmasked(pairs); }, odd_of_pair);
    }
#else
    TORCH_INTERNAL_ASSERT(false, "bfloat16 panels need the AVX-512 or AVX2 build");
#endif
  }

  // acc += A's rows times the pass's vectors from w (at panel row 0) over panel rows [begin, end):
  // the head's part of them, then the tail's.
  template <int NV, int R, bool kPrefetch>
  inline __attribute__((always_inline)) void multiply_panel(V (&acc)[R][NV], const E* w, int64_t stride, const E* a,
                                                            int64_t lda, int64_t lda_k, const E* a_tail,
                                                            int64_t lda_tail, int64_t begin, int64_t end,
                                                            Prefetch& pf) const {
    const int64_t head_end = std::min(end, head_packs_), tail_begin = std::max(begin, head_packs_);
    if (begin < head_end)
      multiply_rows<NV, R, kPrefetch>(acc, w + begin * stride, stride, a + begin * kPack * lda_k, lda, lda_k,
                                      head_end - begin, pf);
    if (tail_begin < end)
      multiply_rows<NV, R, kPrefetch>(acc, w + tail_begin * stride, stride, a_tail + (tail_begin - head_packs_) * kPack,
                                      lda_tail, 1, end - tail_begin, pf);
  }

  template <int NV, int R, bool kPrefetch>
  static inline __attribute__((always_inline)) void multiply_rows(V (&acc)[R][NV], const E* w, int64_t stride,
                                                                  const E* a, int64_t lda, int64_t lda_k,
                                                                  int64_t count, Prefetch& pf) {
    if constexpr (kPack > 1) multiply_add_pairs<NV, R, kPrefetch>(acc, w, stride, a, lda, count, pf);
    else multiply_add<NV, R, kPrefetch>(acc, w, stride, a, lda, lda_k, count, pf);
  }

  // One pass: the NV vectors from `first` of panel p, laid out at `panel`. Kept out of line:
  // inlined into a caller's loop, GCC spills the accumulators to the stack.
  template <int NV, int R>
  __attribute__((noinline)) void kernel(const E* panel, int64_t p, int64_t first, const E* a, int64_t lda,
                                        int64_t lda_k, S beta, S* c, int64_t ldc, const S* bias, const E* a_tail,
                                        int64_t lda_tail, const Sweep& sweep) const {
    std::array<int64_t, NV> col{}, lanes{};
    for (int v = 0; v < NV; ++v) col[v] = column(p, first + v), lanes[v] = valid_lanes(p, first + v);
    const int64_t begin = sweep.begin, end = std::min(sweep.end, panel_rows());
    V acc[R][NV];
    if (begin > 0 || sweep.continues) {  // a later range: on from C
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) {
          if (lanes[v] == kWidth) acc[r][v] = V::loadu(c + r * ldc + col[v]);
          else if (lanes[v] > 0) acc[r][v] = V::loadu(c + r * ldc + col[v], lanes[v]);
          else acc[r][v] = V(S(0));
        }
      }
    } else {
      V start[NV];  // what every row's accumulator starts from besides beta C: the bias, or 0
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        if (bias == nullptr || lanes[v] == 0) start[v] = V(S(0));
        else if (lanes[v] == kWidth) start[v] = V::loadu(bias + col[v]);
        else start[v] = V::loadu(bias + col[v], lanes[v]);
      }
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) {
          if (beta == S(0) || lanes[v] == 0) acc[r][v] = start[v];
          else if (lanes[v] == kWidth) acc[r][v] = at::vec::fmadd(V::loadu(c + r * ldc + col[v]), V(beta), start[v]);
          else acc[r][v] = at::vec::fmadd(V::loadu(c + r * ldc + col[v], lanes[v]), V(beta), start[v]);
        }
      }
    }
    const int64_t stride = vectors_ * kWidth * kPack;
    const E* w = panel + first * kWidth * kPack;
    // Where the panels outgrow the caches (streams_), a block of the pass's full register rows
    // meanwhile fetches its share of the same vectors of the next range into L2: the weight then
    // streams in from memory while this range is multiplied out of cache, instead of the next
    // range's first block waiting for it. A block of fewer rows (the last of a panel, or a single
    // row) does not.
    const bool last = p + 1 == count_ && end == panel_rows();
    const int64_t len = end - begin;
    if (streams_ && sweep.shares > 0 && !last && R == block_rows_for<NV>()) {
      Prefetch pf{w + (begin + len + sweep.share * len / sweep.shares) * stride, sweep.shares, 1};
      multiply_panel<NV, R, true>(acc, w, stride, a, lda, lda_k, a_tail, lda_tail, begin, end, pf);
    } else {
      Prefetch none{nullptr, 0, 0};
      multiply_panel<NV, R, false>(acc, w, stride, a, lda, lda_k, a_tail, lda_tail, begin, end, none);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        if (lanes[v] == kWidth) acc[r][v].store(c + r * ldc + col[v]);
        else if (lanes[v] > 0) acc[r][v].store(c + r * ldc + col[v], lanes[v]);
      }
    }
  }

  at::Tensor data_;  // [count][k / kPack][vectors][kWidth][kPack]
  E* base_ = nullptr;
  // Panels laid out on use (LaidOutOnUse): the weight they come from, in S or in E; no data_.
  const S* source_ = nullptr;
  const E* stored_source_ = nullptr;
  bool source_trans_ = false;
  int64_t k_ = 0, k_tail_ = 0, gates_ = 1, units_ = 0, unit_vectors_ = 1, vectors_ = 0, count_ = 0;
  int64_t head_packs_ = 0, tail_packs_ = 0;  // panel rows of the head's k and of the tail's
  // Whether the panels outgrow a quarter of the last-level cache, so that the steps read them from
  // memory: within it they stay in L3, whence the hardware prefetchers keep up and prefetching
  // only costs issue slots (LSTM B=16 I=H=512, 8 MiB folded: 61 -> 50 ms without, in inference).
  bool streams_ = false;
  // Whether block() runs on AMX tiles (amx_bf16_products, bfloat16 panels), kAmxRows rows a block.
  bool amx_ = false;
};

// The fewest items of `item_work` multiply-adds each that a thread takes in an at::parallel_for of
// the per-step kernels: about 64k multiply-adds pay for waking the other threads (a few
// microseconds).
inline int64_t parallel_grain(int64_t item_work) {
  constexpr int64_t kMinParallelWork = int64_t(1) << 16;
  return std::max<int64_t>(1, kMinParallelWork / std::max<int64_t>(1, item_work));
}

// at::parallel_for(begin, end, grain, f), each thread calling its own copy of f, on its own stack:
// give it a closure holding values (captured by copy), not references to the caller's frame. Read
// from the calling thread's stack, what a product's items read cost the other thread: the loop
// around the items (for_each_panel_block) took 3.6% of a bfloat16 LSTM inference call at B=64
// I=H=512, 1.6% on copies (AVX-512 Zen 4, perf).
template <typename F>
void parallel_for_on_copies(int64_t begin, int64_t end, int64_t grain, const F& f) {
  at::parallel_for(begin, end, grain, [&f](int64_t first, int64_t last) {
    const F own = f;
    own(first, last);
    release_amx_tiles();
  });
}

// Runs multiply(p, first_row, rows, sweep) over every (panel, block of rows, sweep) of an m-row
// product, then finish(p, first_row, rows) for the panel's blocks: in parallel when there is enough
// work, contiguous ranges keeping each thread on its panels (see below). With one sweep per panel,
// each block is finished right after its product (while C's rows are in L1); with several, after
// the panel's.
//
// Panels that fit in half of L2 are cheap to read again, and C may be the large side: a weight's
// gradient over a few rows (k) is a thin product that mostly writes C. Taken a panel at a time,
// every panel would write a strip 64 bytes wide down all of C's rows, a page of memory apart at
// 1024 columns: one TLB miss per row and panel. Such products take kRowBlocksPerGroup blocks of
// rows at a time instead, across every panel, so that those rows of C stay in L1 and the TLB
// while a panel stays in L1 for all of them (AVX2, training, T=1, in-process A/B: GRU B=16
// I=H=1024 1.17x, 9.2 against 10.8 ms; RNN B=64 1.05x; LSTM B=64 I=H=512 1.01x). Each block's
// product is the same either way.
template <class P, typename F, typename G>
void for_each_panel_block(const P& b, int64_t m, int64_t sweep, const F& multiply, const G& finish) {
  using Sweep = typename P::Sweep;
  const int64_t R = b.block_rows(), row_blocks = (m + R - 1) / R, panel_rows = b.panel_rows();
  // The blocks of full register rows share the prefetch of the next range between them.
  const int64_t full_blocks = m / R;
  const auto sweep_of = [=](int64_t lo, int64_t first) {
    return Sweep{lo, lo + sweep, first / R, first + R <= m ? full_blocks : 0};
  };
  if (sweep < panel_rows) {  // a panel's sweeps are far more work than waking a thread
    parallel_for_on_copies(0, b.count(), 1, [=](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        for (int64_t lo = 0; lo < panel_rows; lo += sweep)
          for (int64_t first = 0; first < m; first += R) multiply(p, first, std::min(R, m - first), sweep_of(lo, first));
        for (int64_t first = 0; first < m; first += R) finish(p, first, std::min(R, m - first));
      }
    });
    return;
  }
  constexpr int64_t kRowBlocksPerGroup = 8;
  const int64_t count = b.count();
  const int64_t group = 2 * b.bytes() <= cache_sizes().l2 ? kRowBlocksPerGroup : row_blocks;
  const auto run = [=](int64_t idx) {
    // Item idx: block `within % blocks` of group g's, in panel `within / blocks`.
    const int64_t g = idx / (count * group), within = idx - g * count * group;
    const int64_t blocks = std::min(group, row_blocks - g * group);
    const int64_t p = within / blocks;
    const int64_t first = (g * group + within % blocks) * R, rows = std::min(R, m - first);
    multiply(p, first, rows, sweep_of(0, first));
    finish(p, first, rows);
  };
  // In products of at least kMinSharedRows rows, each thread runs its share of the items in order
  // (its panels stay in its L2 from step to step), then helps with what is left of the others'
  // shares: one core finishing its share later than the other left it waiting 5% of a bfloat16
  // LSTM step at B=64 I=H=512 (rdtsc probe). With fewer rows a share takes a few microseconds, about
  // as long as a thread takes to wake, and a thread done with its own would take over the other's
  // panels, which then leave that core's L2. (AVX-512 Zen 4, 2 threads, in-process A/B over static
  // halves, LSTM inference: B=64 I=H=256-512 1.006-1.016x in bfloat16, 1.014x in float32, GRU
  // float32 1.006x, training 1.007x; B=32 0.993-0.999x, B=1-16 0.980-0.997x; the same build against
  // itself 0.989-0.994x: small gains, near this VM's noise.) Each item runs once.
  constexpr int64_t kMinSharedRows = 64;
  const int64_t items = count * row_blocks, grain = parallel_grain(b.block_work());
  const int64_t shares = std::min<int64_t>(at::get_num_threads(), (items + grain - 1) / grain);
  if (m < kMinSharedRows || shares <= 1 || at::in_parallel_region()) {
    parallel_for_on_copies(0, items, grain, [=](int64_t begin, int64_t end) {
      for (int64_t idx = begin; idx < end; ++idx) run(idx);
    });
    return;
  }
  struct alignas(64) Next {  // a share's next item, on a cache line of its own
    std::atomic<int64_t> item;
  };
  std::vector<Next> next_of_share(shares);
  const int64_t per_share = (items + shares - 1) / shares;
  for (int64_t t = 0; t < shares; ++t) next_of_share[t].item.store(t * per_share, std::memory_order_relaxed);
  parallel_for_on_copies(0, shares, 1, [=, next = next_of_share.data()](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t k = 0; k < shares; ++k) {  // share t, then the others'
        const int64_t share = (t + k) % shares, stop = std::min(items, (share + 1) * per_share);
        for (int64_t idx; (idx = next[share].item.fetch_add(1, std::memory_order_relaxed)) < stop;) run(idx);
      }
  });
}

template <typename S, typename E>
void Panels<S, E>::multiply(int64_t m, const E* a, int64_t lda, int64_t lda_k, S beta, S* c, int64_t ldc,
                            const S* bias) const {
  TORCH_INTERNAL_ASSERT(k_tail_ == 0, "Panels::multiply reads A from one matrix");
  if constexpr (kPack == 1) {  // (panels laid out on use are in S)
    if (source_ != nullptr && !source_trans_) {
      multiply_on_use_by_blocks(m, a, lda, lda_k, beta, c, ldc, bias);
      return;
    }
  }
  if (source_ != nullptr || stored_source_ != nullptr) {
    // Each thread lays out its panels one at a time (each a block of whole rows of w^T), each
    // multiplied by all of A's rows before the next.
    const int64_t R = block_rows();
    at::parallel_for(0, count_, 1, [&](int64_t begin, int64_t end) {
      const at::Tensor buffer = cpu_scratch(Scratch::kPanelOnUse, {panel_size()},
                                            at::TensorOptions().dtype(c10::CppTypeToScalarType<E>::value));
      E* panel = buffer.template data_ptr<E>();
      for (int64_t p = begin; p < end; ++p) {
        if (stored_source_ != nullptr) lay_out<E>(panel, p, stored_source_, source_trans_, nullptr);
        else lay_out<S>(panel, p, source_, source_trans_, nullptr);
        for (int64_t first = 0; first < m; first += R)
          block_in(panel, p, std::min(R, m - first), a + first * lda, lda, lda_k, beta, c + first * ldc, ldc, bias,
                   nullptr, 0, Sweep{0, panel_rows(), 0, 0});
      }
      release_amx_tiles();
    });
    return;
  }
  for_each_panel_block(
      *this, m, panel_rows(),
      [=, this](int64_t p, int64_t first, int64_t rows, Sweep sweep) {
        block(p, rows, a + first * lda, lda, lda_k, beta, c + first * ldc, ldc, bias, nullptr, 0, sweep);
      },
      [](int64_t, int64_t, int64_t) {});
}

// multiply() on panels of w [k, n] laid out on use. A panel is a strip of w's columns whose k rows
// lie n values apart, a page or more at n >= 1024: laid out whole, each of its rows would take a TLB
// miss and wait for memory, for every panel (for the backward's input gradient through a GRU's
// 48 MiB W_ih at H=2048, 2-3% of the whole call). Each thread lays out a block of k rows of one of
// its panels at a time instead, the blocks of all its panels in turn before the next k: the block's
// rows of w then stay in the TLB for the next panel's, and while all of A's rows multiply one
// block, the next is prefetched into L2 a slice at a time. A block and A's same columns take about
// half of L2. Each sum adds the same products in the same order as over whole panels.
template <typename S, typename E>
void Panels<S, E>::multiply_on_use_by_blocks(int64_t m, const E* a, int64_t lda, int64_t lda_k, S beta, S* c,
                                             int64_t ldc, const S* bias) const {
  static_assert(kPack == 1);
  const int64_t R = block_rows(), width = vectors_ * kWidth, n = units_;
  const int64_t block_bytes_per_k = (m + width) * static_cast<int64_t>(sizeof(E));
  const int64_t k_block = std::max<int64_t>(16, cache_sizes().l2 / 2 / block_bytes_per_k / 16 * 16);
  const int64_t row_blocks = (m + R - 1) / R;
  at::parallel_for(0, count_, 1, [&](int64_t begin, int64_t end) {
    const at::Tensor buffer = cpu_scratch(Scratch::kPanelOnUse, {std::min(k_block, k_) * width},
                                          at::TensorOptions().dtype(c10::CppTypeToScalarType<E>::value));
    E* panel = buffer.template data_ptr<E>();
    // Columns [unit(p, 0), + lanes(p)) of w are panel p's.
    const auto lanes = [&](int64_t p) { return std::clamp<int64_t>(n - unit(p, 0), 0, width); };
    for (int64_t lo = 0; lo < k_; lo += k_block) {
      const int64_t hi = std::min(k_, lo + k_block);
      for (int64_t p = begin; p < end; ++p) {
        const S* strip = source_ + unit(p, 0);
        const int64_t valid = lanes(p);
        for (int64_t i = lo; i < hi; ++i) {
          std::copy_n(strip + i * n, valid, panel + (i - lo) * width);
          std::fill_n(panel + (i - lo) * width + valid, width - valid, S(0));
        }
        // The next block: panel p + 1's rows [lo, hi), else the first panel's of the next k.
        const bool same_k = p + 1 < end;
        const int64_t next_lo = same_k ? lo : hi, next_hi = std::min(k_, next_lo + k_block);
        const S* next_strip = source_ + unit(same_k ? p + 1 : begin, 0);
        const int64_t next_bytes = lanes(same_k ? p + 1 : begin) * static_cast<int64_t>(sizeof(S));
        const int64_t slice = (next_hi - next_lo + row_blocks - 1) / row_blocks;
        int64_t next = next_lo;
        for (int64_t first = 0; first < m; first += R) {
          block_in(panel, p, std::min(R, m - first), a + first * lda + lo * lda_k, lda, lda_k, beta,
                   c + first * ldc, ldc, bias, nullptr, 0, Sweep{0, hi - lo, 0, 0, lo > 0});
          for (const int64_t stop = std::min(next_hi, next + slice); next < stop; ++next)
            prefetch_to_l2(next_strip + next * n, next_bytes);
        }
      }
    }
  });
}

}  // namespace fused_rnn
