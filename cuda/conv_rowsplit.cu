// Direct sparse convolution for few output pixels (deep layers at small batch, linear layers
// at small batch): WPR warps per output channel and per 16 output pixels; the row's nonzeros
// are split across the WPR*32 lanes (each lane keeps 16 partial sums), then a reduce-scatter of
// 16 shuffles leaves pixel (lane >> 1) in each even lane, and with WPR > 1 the warps of a row
// add their sums through shared memory in a fixed order. Input is read through L1.
// WPR > 1 is for rows too long or too few for one warp each: a trained layer keeps a few long
// rows, and each row's nonzeros are one lane's serial chain of dependent loads.
// CONTIGUOUS: a 1x1 conv on image rows whose 16 pixels are consecutive in memory and aligned
// (contiguous_pixels): a lane reads its 16 inputs as 4 vector loads (16 bytes each in fp32, 8 in
// fp16/bf16), a quarter of the L1 requests of 16 scalar ones.
#include <cstdint>

#include "kernels.cuh"

namespace sparsebench {

template <typename T, int WPR, bool CONTIGUOUS>
__global__ void __launch_bounds__(kRowSplitWarps * 32)
    conv_rowsplit_kernel(const ConvArgs a, const FastDiv div_ohw, const FastDiv div_ow, const FastDiv div_kk,
                         const FastDiv div_kw, const int M) {
  constexpr int P = kRowSplitPixels;
  static_assert(P == 16, "the reduce-scatter below is written for 16 pixels");
  static_assert(kRowSplitWarps % WPR == 0, "a block holds whole rows");
  constexpr unsigned FULL = 0xffffffffu;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int part = warp % WPR;  // which share of the row's nonzeros this warp sums
  const int rr = blockIdx.y * (kRowSplitWarps / WPR) + warp / WPR;
  // With one warp per row a warp past the last row leaves; with several, it stays for the
  // block-wide barrier and sums nothing.
  if (WPR == 1 && rr >= a.CO) return;
  const bool live = rr < a.CO;
  const int row = live ? block_row(a, rr) : 0;
  const int m0 = blockIdx.x * P;
  const int OHW = a.OH * a.OW, HW = a.H * a.W;

  int pbase[P], ih0[P], iw0[P];
#pragma unroll
  for (int p = 0; p < P; ++p) {
    const int m = m0 + p;
    if (m < M) {
      const int n = div_ohw.div(m), rem = m - n * OHW;
      const int oh = div_ow.div(rem), ow = rem - oh * a.OW;
      ih0[p] = oh * a.stride - a.pad;
      iw0[p] = ow * a.stride - a.pad;
      pbase[p] = n * a.C * HW + ih0[p] * a.W + iw0[p];
    } else {
      ih0[p] = -(1 << 24);  // every tap falls outside
      iw0[p] = 0;
      pbase[p] = 0;
    }
  }

  const T* __restrict__ x = static_cast<const T*>(a.x);
  float acc[P];
#pragma unroll
  for (int p = 0; p < P; ++p) acc[p] = 0.f;
  const int end = live ? __ldg(a.rowptr + row + 1) : 0;
  const RowDecode rs = live ? row_decode(a, row) : RowDecode{};
  if (CONTIGUOUS) {  // (kh, kw) = (0, 0): the column is the input channel
    // The 16 pixels lie in one image (host check), from pixel m0 - n*HW of channel row 0.
    const int groups = min(P, M - m0) / 4;  // M is a multiple of 4 here
    const T* base = x + pbase[0];
    for (int k = (live ? __ldg(a.rowptr + row) : 0) + part * 32 + lane; k < end; k += WPR * 32) {
      const int ci = load_col(a, k);
      const float w = decode_value(a, rs, k);
      const T* src = base + ci * HW;
#pragma unroll
      for (int g = 0; g < P / 4; ++g) {
        if (g < groups) {
          float v[4];
          load_act4<T>(src + 4 * g, v);
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[4 * g + i] = fmaf(w, v[i], acc[4 * g + i]);
        }
      }
    }
  } else {
    for (int k = (live ? __ldg(a.rowptr + row) : 0) + part * 32 + lane; k < end; k += WPR * 32) {
      const int col = load_col(a, k);
      const int ci = div_kk.div(col), rem = col - ci * (a.KH * a.KW);
      const int kh = div_kw.div(rem), kw = rem - kh * a.KW;
      const float w = decode_value(a, rs, k);
      const int off = ci * HW + kh * a.W + kw;
#pragma unroll
      for (int p = 0; p < P; ++p) {
        const int ih = ih0[p] + kh, iw = iw0[p] + kw;
        if (static_cast<unsigned>(ih) < static_cast<unsigned>(a.H) && static_cast<unsigned>(iw) < static_cast<unsigned>(a.W))
          acc[p] = fmaf(w, load_act(x + pbase[p] + off), acc[p]);
      }
    }
  }

  // Reduce-scatter: after each step a lane keeps the half of its sums that its lane bit selects.
  float v8[8], v4[4], v2[2];
#pragma unroll
  for (int p = 0; p < 8; ++p) {
    const bool hi = lane & 16;
    v8[p] = (hi ? acc[p + 8] : acc[p]) + __shfl_xor_sync(FULL, hi ? acc[p] : acc[p + 8], 16);
  }
#pragma unroll
  for (int p = 0; p < 4; ++p) {
    const bool hi = lane & 8;
    v4[p] = (hi ? v8[p + 4] : v8[p]) + __shfl_xor_sync(FULL, hi ? v8[p] : v8[p + 4], 8);
  }
#pragma unroll
  for (int p = 0; p < 2; ++p) {
    const bool hi = lane & 4;
    v2[p] = (hi ? v4[p + 2] : v4[p]) + __shfl_xor_sync(FULL, hi ? v4[p] : v4[p + 2], 4);
  }
  const bool hi = lane & 2;
  float v = (hi ? v2[1] : v2[0]) + __shfl_xor_sync(FULL, hi ? v2[0] : v2[1], 2);
  v += __shfl_xor_sync(FULL, v, 1);

  if (WPR > 1) {  // the row's warps add up in shared memory, in warp order (deterministic)
    __shared__ float partial[kRowSplitWarps][P];
    if ((lane & 1) == 0) partial[warp][lane >> 1] = v;
    __syncthreads();
    if (part != 0) return;
#pragma unroll
    for (int w = 1; w < WPR; ++w) v += partial[warp + w][(lane >> 1) & 15];
  }

  const int m = m0 + ((lane >> 1) & 15);
  if (live && (lane & 1) == 0 && m < M) {
    const int n = div_ohw.div(m), rem = m - n * OHW;
    v += a.bias ? __ldg(a.bias + row) : 0.f;
    if (a.relu) v = v < 0.f ? 0.f : v;
    T* __restrict__ out = static_cast<T*>(a.out);
    out[(static_cast<size_t>(n) * a.CO + row) * OHW + rem] = from_f32<T>(v);
  }
}

template <typename T, int WPR>
static void launch_rowsplit_t(const ConvArgs& a, cudaStream_t stream) {
  const int M = a.N * a.OH * a.OW;
  constexpr int rows_per_block = kRowSplitWarps / WPR;
  const dim3 grid(static_cast<unsigned>((M + kRowSplitPixels - 1) / kRowSplitPixels),
                  static_cast<unsigned>((a.CO + rows_per_block - 1) / rows_per_block));
  const bool contiguous = contiguous_pixels(a) && reinterpret_cast<uintptr_t>(a.x) % 16 == 0;
  auto kernel = contiguous ? conv_rowsplit_kernel<T, WPR, true> : conv_rowsplit_kernel<T, WPR, false>;
  kernel<<<grid, kRowSplitWarps * 32, 0, stream>>>(a, FastDiv(a.OH * a.OW), FastDiv(a.OW), FastDiv(a.KH * a.KW),
                                                   FastDiv(a.KW), M);
}

template <int WPR>
static void launch_rowsplit_w(const ConvArgs& a, cudaStream_t stream) {
  switch (a.act_dtype) {
    case kF32: launch_rowsplit_t<float, WPR>(a, stream); break;
    case kF16: launch_rowsplit_t<__half, WPR>(a, stream); break;
    default: launch_rowsplit_t<__nv_bfloat16, WPR>(a, stream); break;
  }
}

std::string launch_rowsplit(const ConvArgs& a, int warps_per_row, cudaStream_t stream) {
  if (warps_per_row != 1 && warps_per_row != 2 && warps_per_row != 4)
    return "row-split kernel: warps_per_row must be 1, 2 or 4";
  const int rows_per_block = kRowSplitWarps / warps_per_row;
  if ((a.CO + rows_per_block - 1) / rows_per_block > 65535) return "row-split kernel: too many output channels";
  switch (warps_per_row) {
    case 1: launch_rowsplit_w<1>(a, stream); break;
    case 2: launch_rowsplit_w<2>(a, stream); break;
    default: launch_rowsplit_w<4>(a, stream); break;
  }
  return "";
}

}  // namespace sparsebench
