// AVX512-BF16's two instructions that the CPU kernels use, as inline assembly: a function that
// uses them then needs no target("avx512bf16") attribute, which GCC does not inline across, so a
// kernel's loop keeps its accumulators in registers around them and a pointwise pass rounds its
// results in line. They run only where bf16_products_for (backend.cpp) found the CPU has them.
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
#endif
