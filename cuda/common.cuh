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

// Four consecutive activations, as one 16-byte (fp32) or 8-byte (fp16/bf16) load: p must be aligned to it.
template <typename T> __device__ __forceinline__ void load_act4(const T* p, float (&v)[4]);
template <> __device__ __forceinline__ void load_act4<float>(const float* p, float (&v)[4]) {
  const float4 q = __ldg(reinterpret_cast<const float4*>(p));
  v[0] = q.x; v[1] = q.y; v[2] = q.z; v[3] = q.w;
}
template <typename T> __device__ __forceinline__ void load_act4(const T* p, float (&v)[4]) {
  const uint2 q = __ldg(reinterpret_cast<const uint2*>(p));
  const T* h = reinterpret_cast<const T*>(&q);
#pragma unroll
  for (int i = 0; i < 4; ++i) v[i] = to_f32<T>(h[i]);
}

// Division by a divisor fixed at launch, without a branch: q = (umulhi(n, mul) + n) >> shr with a
// 33-bit magic number (mul + 2^32), l = ceil(log2 d); exact for n < 2^31 (the sum then fits 32 bits),
// and d = 1 is mul 1, shr 0.
struct FastDiv {
  uint32_t d = 1, mul = 1, shr = 0;
  FastDiv() = default;
  explicit FastDiv(uint32_t div) : d(div) {
    if (d == 0) return;  // never divided by: the identity
    uint32_t l = 0;
    while ((1ull << l) < d) ++l;
    mul = static_cast<uint32_t>(((1ull << 32) * ((1ull << l) - d)) / d + 1);
    shr = l;
  }
  __device__ __forceinline__ uint32_t div(uint32_t n) const { return (__umulhi(n, mul) + n) >> shr; }
};

__device__ __forceinline__ int load_col(const ConvArgs& a, int k) {
  return a.col_bits == 16 ? static_cast<int>(__ldg(static_cast<const uint16_t*>(a.colidx) + k))
                          : __ldg(static_cast<const int32_t*>(a.colidx) + k);
}

// A row's dequantization constants, loaded once per row rather than once per nonzero. `offset` is
// the zero point of linear codes, or where the row's levels start in a per-channel codebook (0 for a
// layer's one codebook): one field for both, so per-channel codebooks cost the kernels no register.
struct RowDecode {
  float scale = 1.f;
  int offset = 0;
};

__device__ __forceinline__ RowDecode row_decode(const ConvArgs& a, int row) {
  RowDecode r;
  if (a.value_kind == kValLinear) {
    r.scale = __ldg(a.scale + row);
    r.offset = __ldg(a.zero_point + row);
  } else if (a.value_kind == kValCodebook) {
    r.offset = row * a.codebook_stride;
  }
  return r;
}

// The fp32 value of nonzero k (of the row `r` belongs to), exactly as PackedLayer.nonzero_values() computes it.
__device__ __forceinline__ float decode_value(const ConvArgs& a, const RowDecode& r, int k) {
  switch (a.value_kind) {
    case kValF32: return __ldg(static_cast<const float*>(a.values) + k);
    case kValF16: return __half2float(static_cast<const __half*>(a.values)[k]);
    default: {
      const uint64_t bit = static_cast<uint64_t>(k) * a.bits;
      const uint32_t byte = __ldg(static_cast<const uint8_t*>(a.values) + (bit >> 3));
      const int code = static_cast<int>((byte >> (bit & 7)) & ((1u << a.bits) - 1));
      if (a.value_kind == kValCodebook) return __ldg(a.codebook + r.offset + code);
      return r.scale * static_cast<float>(code - r.offset);
    }
  }
}

__device__ __forceinline__ int block_row(const ConvArgs& a, int r) {
  return a.row_order ? __ldg(a.row_order + r) : r;
}

}  // namespace sparsebench
