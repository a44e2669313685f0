// The implicit-GEMM kernels' shared pieces (conv_gemm.cu: mma.sync; conv_wgmma.cu: Hopper wgmma): the im2col
// gather of a k-step's pixels into shared memory, and the epilogue of one group's accumulators.
//
// A stage's pixels are rows of 32 taps (64 bytes: one k-step of one output pixel, taps in (kh, kw, ci) order, so
// 8 consecutive taps are 16 contiguous bytes of a channels_last pixel), their four 16-byte units XOR-swizzled by
// row bits 1-2. That is both what ldmatrix reads without bank conflicts and wgmma's 64-byte swizzle mode.
#pragma once
#include "common.cuh"
#include "kernels.cuh"
#include "mma.cuh"

namespace sparsebench {

namespace {

// The pixel rows one thread of kThreads copies each k-step for a block of BN pixels from pix0: unit u = tid % 4
// (taps 8u .. 8u + 7 of the step) of rows tid / 4 + i * kThreads / 4. A pixel past the last reads as outside the
// image, and so does a tap past K: both are zero-filled.
template <int BN, int kThreads>
struct PixelGather {
  static constexpr int kRows = 4 * BN / kThreads;
  static_assert(kRows >= 1 && 4 * BN % kThreads == 0, "a block's pixel rows must split evenly over its threads");
  int unit;
  int ih0[kRows], iw0[kRows], img[kRows];
  uint32_t dst[kRows];

  __device__ __forceinline__ PixelGather(const ConvArgs& a, const GemmCfg& t, int tid, int pix0) : unit(tid & 3) {
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int r = tid / 4 + i * (kThreads / 4), p = pix0 + r;
      const int n = t.div_OHOW.div(p), rem = p - n * (a.OH * a.OW);
      const int oh = t.div_OW.div(rem), ow = rem - oh * a.OW;
      ih0[i] = p < t.M ? oh * a.stride - a.pad : -(1 << 24);
      iw0[i] = ow * a.stride - a.pad;
      img[i] = p < t.M ? n * a.H * a.W * a.C : 0;
      dst[i] = r * 64 + ((unit ^ ((r >> 1) & 3)) << 4);
    }
  }

  // Step s's pixels into the stage at shared address `at`, by cp.async (the caller commits).
  template <typename T>
  __device__ __forceinline__ void copy(const ConvArgs& a, const GemmCfg& t, int s, uint32_t at) const {
    const T* __restrict__ x = static_cast<const T*>(a.x);
    const int k = s * kPairK + unit * 8;
    const int tap = t.div_C.div(k), ci = k - tap * a.C;
    const int kh = t.div_KW.div(tap), kw = tap - kh * a.KW;
    const bool k_in = k < t.K;
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int ih = ih0[i] + kh, iw = iw0[i] + kw;
      const bool in = k_in && static_cast<unsigned>(ih) < static_cast<unsigned>(a.H) &&
                      static_cast<unsigned>(iw) < static_cast<unsigned>(a.W);
      const T* src = in ? x + img[i] + (ih * a.W + iw) * a.C + ci : x;
      cp_async16_zfill(at + dst[i], src, in ? 16 : 0);
    }
  }
};

// One group's accumulators of NT n8 pixel tiles from pixel `pix` on (acc[j][v]: channel slot g + 8 * (v / 2) of
// the group, pixel pix + 8j + 2q + v % 2), scaled (linear codes), biased, rectified and stored channels_last.
template <typename T, int NT>
__device__ __forceinline__ void store_group(const ConvArgs& a, int M, int group, int pix, const float (&acc)[NT][4]) {
  const int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
  const bool scaled = a.tc_kind == kTcLinear;
  T* __restrict__ out = static_cast<T*>(a.out);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int c = __ldg(a.tile_rows + group * kTileRows + g + 8 * h);
    if (c < 0) continue;
    const float scale = scaled ? __ldg(a.scale + c) : 1.f, bias = a.bias ? __ldg(a.bias + c) : 0.f;
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int p = pix + j * 8 + 2 * q + e;
        if (p >= M) continue;
        float y = acc[j][2 * h + e] * scale + bias;
        if (a.relu) y = y < 0.f ? 0.f : y;  // keeps NaN, like torch.relu
        out[static_cast<int64_t>(p) * a.CO + c] = from_f32<T>(y);
      }
  }
}

}  // namespace

}  // namespace sparsebench
