// AVX512-BF16's two instructions that the CPU kernels use, as inline assembly: a function that
// uses them then needs no target("avx512bf16") attribute, which GCC does not inline across, so a
// kernel's loop keeps its accumulators in registers around them and a pointwise pass rounds its
// results in line. They run only where bf16_products_for (backend.cpp) found the CPU has them. In
// the AVX2 build, what the kernels widen bfloat16 operands with instead.
#pragma once

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>

namespace fused_rnn {

// acc + the dot products of a's and b's 32-bit lanes, each a pair of bfloat16 (vdpbf16ps).
inline __attribute__((always_inline)) __m512 dot_bf16_pairs(__m512 acc, __m512i a, __m512i b) {
  asm("vdpbf16ps %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
  return acc;
}

// v's 16 values rounded to bfloat16, to nearest, ties to even (vcvtneps2bf16). Denormals flush
// to zero, as the dot-product instruction treats them anyway.
inline __attribute__((always_inline)) __m256i round_vector_to_bf16(__m512 v) {
  __m256i rounded;
  asm("vcvtneps2bf16 %1, %0" : "=v"(rounded) : "v"(v));
  return rounded;
}

}  // namespace fused_rnn

#elif defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>

namespace fused_rnn {

// Without AVX512-BF16 (the AVX2 build), bfloat16 products are float32 FMAs on the operands widened
// exactly: a bfloat16's bits are the high half of the float32 of the same value. Of 32-bit lanes
// that each hold a pair (the even k's value in the low half, the odd k's in the high), the even
// k's values and the odd k's, as float32.
inline __attribute__((always_inline)) __m256 even_bf16s(__m256i pairs) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16));
}
inline __attribute__((always_inline)) __m256 odd_bf16s(__m256i pairs) {
  return _mm256_castsi256_ps(_mm256_and_si256(pairs, _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u))));
}
// The same by two shifts instead of a mask, whose register the panel kernel's sums need.
inline __attribute__((always_inline)) __m256 odd_bf16s_unmasked(__m256i pairs) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_srli_epi32(pairs, 16), 16));
}
// 8 bfloat16 values at p as float32.
inline __attribute__((always_inline)) __m256 widened_bf16s(const void* p) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

}  // namespace fused_rnn
#endif
