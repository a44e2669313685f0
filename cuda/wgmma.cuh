// Hopper warpgroup MMA (sm_90a only): the sparse wgmma with A in registers and B in shared memory, its shared-memory
// descriptor, and the fences and groups that order it. conv_wgmma.cu is the one file that includes it, built for
// sm_90a alone (cuda/CMakeLists.txt).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace sparsebench {

namespace {

// The descriptor of a K-major B tile in shared memory: rows (one pixel each) of 32 taps, 64 bytes, consecutive,
// their four 16-byte units XOR-swizzled by row bits 1-2 (the 64-byte swizzle mode, whose pattern repeats every 8
// rows, 512 bytes: `addr` must be 512-byte aligned; the kernel's stages are 1024-byte aligned). The stride between 8-row core matrices is 512 bytes; the
// leading offset is unused where a row is one swizzle width.
__device__ __forceinline__ uint64_t wgmma_desc_k64(uint32_t addr) {
  constexpr uint64_t kSwizzle64 = 2;
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (uint64_t{1} << 16) | (uint64_t{512 >> 4} << 32) |
         (kSwizzle64 << 62);
}

// Order this thread's earlier shared-memory writes (cp.async included) before the tensor cores' reads.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// Keeps the compiler from moving accumulator reads or writes across a wgmma fence or wait.
template <int NT>
__device__ __forceinline__ void wgmma_fence_operands(float (&acc)[NT][4]) {
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int v = 0; v < 4; ++v) asm volatile("" : "+f"(acc[j][v])::"memory");
}

// D (64 channels x 64 pixels, fp32) += A (64 x 32 taps, 2:4 sparse: four registers a thread, the m16n8k32 A fragment
// of the warp's 16 rows) x B (32 taps x 64 pixels at `desc`), metadata e from lanes 4g and 4g + 1 (selector 0).
// d[j][v] is the m16n8 accumulator v of pixel tile j: row g + 8 * (v / 2), pixel 8j + 2q + v % 2.
template <typename T> struct Wgmma;

#define SB_WGMMA_TILE(j) "+f"(d[j][0]), "+f"(d[j][1]), "+f"(d[j][2]), "+f"(d[j][3])
#define SB_DEFINE_WGMMA(T, TY)                                                                                    \
  template <> struct Wgmma<T> {                                                                                   \
    static __device__ __forceinline__ void sp_n64(float (&d)[8][4], const uint32_t (&a)[4], uint64_t desc,       \
                                                  uint32_t e) {                                                   \
      asm volatile(                                                                                               \
          "wgmma.mma_async.sp.sync.aligned.m64n64k32.f32." TY "." TY " "                                          \
          "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                              \
          "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "                    \
          "{%32, %33, %34, %35}, %36, %37, 0, 1, 1, 1, 0;\n"                                                      \
          : SB_WGMMA_TILE(0), SB_WGMMA_TILE(1), SB_WGMMA_TILE(2), SB_WGMMA_TILE(3), SB_WGMMA_TILE(4), SB_WGMMA_TILE(5),       \
            SB_WGMMA_TILE(6), SB_WGMMA_TILE(7)                                                                        \
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(e));                                     \
    }                                                                                                             \
  };

SB_DEFINE_WGMMA(__half, "f16")
SB_DEFINE_WGMMA(__nv_bfloat16, "bf16")
#undef SB_DEFINE_WGMMA
#undef SB_WGMMA_TILE

}  // namespace

}  // namespace sparsebench
