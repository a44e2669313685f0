// Small device building blocks shared by the kernels: activation load/store, fast
// division by run-time constants, weight decode.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

#include "sparsebench.h"

namespace sparsebench {

template <typename T> __device__ __forceinline__ float to_f32(T v);
template <> __device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T> __device__ __forceinline__ float load_act(const T* p) { return to_f32<T>(__ldg(p)); }

// Division by a divisor fixed at launch (round-up multiply-shift; exact for n < 2^31).
struct FastDiv {
  uint32_t d = 1, mul = 0, shr = 0;
  FastDiv() = default;
  explicit FastDiv(uint32_t div) : d(div) {
    if (d > 1) {
      uint32_t l = 0;
      while ((1u << l) < d) ++l;
      uint64_t p = 31 + l;
      mul = static_cast<uint32_t>(((1ull << p) + d - 1) / d);
      shr = static_cast<uint32_t>(p - 32);
    }
  }
  __device__ __forceinline__ uint32_t div(uint32_t n) const { return d == 1 ? n : (__umulhi(n, mul) >> shr); }
};

__device__ __forceinline__ int load_col(const ConvArgs& a, int k) {
  return a.col_bits == 16 ? static_cast<int>(__ldg(static_cast<const uint16_t*>(a.colidx) + k))
                          : __ldg(static_cast<const int32_t*>(a.colidx) + k);
}

// The fp32 value of nonzero k of `row`, exactly as PackedLayer.nonzero_values() computes it.
__device__ __forceinline__ float decode_value(const ConvArgs& a, int row, int k) {
  switch (a.value_kind) {
    case kValF32: return __ldg(static_cast<const float*>(a.values) + k);
    case kValF16: return __half2float(static_cast<const __half*>(a.values)[k]);
    default: {
      const uint64_t bit = static_cast<uint64_t>(k) * a.bits;
      const uint32_t byte = __ldg(static_cast<const uint8_t*>(a.values) + (bit >> 3));
      const int code = static_cast<int>((byte >> (bit & 7)) & ((1u << a.bits) - 1));
      if (a.value_kind == kValCodebook) return __ldg(a.codebook + code);
      return __ldg(a.scale + row) * static_cast<float>(code - __ldg(a.zero_point + row));
    }
  }
}

__device__ __forceinline__ int block_row(const ConvArgs& a, int r) {
  return a.row_order ? __ldg(a.row_order + r) : r;
}

}  // namespace sparsebench
