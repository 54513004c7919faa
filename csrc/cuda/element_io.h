// Moving cell values between their storage type and the type the gate math runs in, on the GPU:
// float and double compute in themselves, float16 and bfloat16 in float. Shared by the per-step
// kernels (kernels.cu) and the persistent ones (persistent.cu).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../cells.h"

namespace fused_rnn {

// The type the gate math runs in for storage type S.
template <typename S>
struct MathType {
  using type = S;
};
template <>
struct MathType<__half> {
  using type = float;
};
template <>
struct MathType<__nv_bfloat16> {
  using type = float;
};

// Moves one element between storage S and math type V (loads widen, stores round to nearest).
template <typename S, typename V>
struct ElementIO {
  static FR_HD V load(const S* p) { return *p; }
  static FR_HD void store(S* p, V v) { *p = v; }
};
template <>
struct ElementIO<__half, float> {
  static FR_HD float load(const __half* p) { return __half2float(*p); }
  static FR_HD void store(__half* p, float v) { *p = __float2half_rn(v); }
};
template <>
struct ElementIO<__nv_bfloat16, float> {
  static FR_HD float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
  static FR_HD void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
};

}  // namespace fused_rnn
