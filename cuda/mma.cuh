// Warp-level tensor-core building blocks shared by the tensor-core kernels (conv_tensor.cuh, conv_gemm.cu):
// the MMAs of one activation dtype, ldmatrix, and cp.async copies into shared memory.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace sparsebench {

namespace {

// The warp MMAs of one activation dtype (its PTX type TY), fp32 accumulation:
// - run: dense m16n8k16, A (16 x 16) and B (16 x 8, two registers);
// - run_sp: the sparse m16n8k32. A (16 channels x 32 taps, at most two nonzeros in each row's chunk of
//   four) is stored as its nonzeros (a, the m16n8k16 A layout) and their positions (e: lanes 4g and 4g + 1
//   of each quad, selector 0); B (32 taps x 8 pixels) is four registers, b[j] taps 8j + 2q, 8j + 2q + 1 of
//   pixel g.
// - pack: two floats as a register of two TY.
template <typename T> struct Mma;

#define SB_DEFINE_MMA(T, TY, PACK2)                                                                            \
  template <> struct Mma<T> {                                                                                 \
    static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) { \
      asm("mma.sync.aligned.m16n8k16.row.col.f32." TY "." TY ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "    \
          "{%0,%1,%2,%3};\n"                                                                                   \
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                                     \
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));                                   \
    }                                                                                                         \
    static __device__ __forceinline__ void run_sp(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4], \
                                                  uint32_t e) {                                               \
      asm("mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32." TY "." TY ".f32 {%0,%1,%2,%3}, "       \
          "{%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0;\n"                                           \
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                                     \
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));   \
    }                                                                                                         \
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {                                     \
      const auto h = PACK2(lo, hi);                                                                           \
      return *reinterpret_cast<const uint32_t*>(&h);                                                          \
    }                                                                                                         \
  };

SB_DEFINE_MMA(__half, "f16", __floats2half2_rn)
SB_DEFINE_MMA(__nv_bfloat16, "bf16", __floats2bfloat162_rn)
#undef SB_DEFINE_MMA

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// Four 8x8 matrices of 16-bit values, row i of matrix m at the address lane 8m + i gives; lane 4g + q receives
// elements 2q, 2q + 1 of row g of each.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// 16 bytes from global to shared memory, bypassing L1; the _zfill form copies `bytes` (0 or 16) of them and
// zero-fills the rest, so a padding or out-of-image read is a copy of zeros (src must still be a valid address).
__device__ __forceinline__ void cp_async16_zfill(uint32_t dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

}  // namespace

}  // namespace sparsebench
