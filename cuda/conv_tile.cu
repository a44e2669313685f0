// Direct sparse convolution, tiled: one block = a group of output channels (rows) x a tile
// of output pixels. The input tile (with halo, zero padding included) is staged in shared
// memory chunk by chunk over C_in, laid out so that the 4 "slots" of a thread (4 images, or
// 4 row bands of one image) sit side by side: each nonzero costs one 16-byte shared load and
// 4 FMAs per thread. The rows' nonzeros of the chunk are decoded once per block into
// (value, shared-memory offset) pairs, so low-bit codes cost nothing in the inner loop.
#include <climits>

#include "tile.cuh"

namespace sparsebench {

struct Entry {
  float w;
  int off;  // float4 offset of the tap inside the staged chunk
};

template <typename T, int R>
__global__ void __launch_bounds__(256) conv_tile_kernel(const ConvArgs a, const TileCfg t) {
  extern __shared__ float4 smem4[];
  const int S = 4 * t.G;
  float4* s_in = smem4;
  Entry* s_w = reinterpret_cast<Entry*>(s_in + t.CC * t.G * t.RH * t.RW);
  int* s_cnt = reinterpret_cast<int*>(s_w + R * t.cap);
  int* s_cur = s_cnt + R;
  int* s_end = s_cur + R;
  int* s_row = s_end + R;
  int* s_n = s_row + R;
  int* s_oh0 = s_n + S;

  const int tid = threadIdx.x, nthreads = blockDim.x;
  const T* __restrict__ x = static_cast<const T*>(a.x);
  if (tid < R) {
    const int rr = blockIdx.z * R + tid;
    const int row = rr < a.CO ? block_row(a, rr) : -1;
    s_row[tid] = row;
    s_cur[tid] = row >= 0 ? __ldg(a.rowptr + row) : 0;
    s_end[tid] = row >= 0 ? __ldg(a.rowptr + row + 1) : 0;
  }
  for (int q = tid; q < S; q += nthreads) {
    const int gs = blockIdx.x * S + q;
    if (gs < t.total_slots) {
      const int n = t.div_bands.div(gs);
      s_n[q] = n;
      s_oh0[q] = (gs - n * t.n_bands) * t.TH;
    } else {
      s_n[q] = -1;
      s_oh0[q] = 0;
    }
  }
  const int positions = t.TH * t.TW;
  const bool active = tid < t.G * positions;
  const int g = tid / positions;
  const int pos = tid - g * positions;
  const int ta = pos / t.TW, tb = pos - (pos / t.TW) * t.TW;
  const int base = (g * t.RH + ta * a.stride) * t.RW + tb * a.stride;
  const int ow0 = blockIdx.y * t.TW;
  const int iw0 = ow0 * a.stride - a.pad;
  const int KK = a.KH * a.KW;
  const int lane = tid & 31, warp = tid >> 5, nwarps = nthreads >> 5;

  float acc[R][4];
#pragma unroll
  for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  __syncthreads();

  for (int c0 = 0; c0 < a.C; c0 += t.CC) {
    const int ccn = min(t.CC, a.C - c0);
    // Stage the input chunk; consecutive threads read consecutive iw (coalesced).
    float* s_in_f = reinterpret_cast<float*>(s_in);
    const int total = ccn * t.G * 4 * t.RH * t.RW;
    for (int e = tid; e < total; e += nthreads) {
      const int t1 = t.div_RW.div(e), c = e - t1 * t.RW;
      const int t2 = t.div_RH.div(t1), r = t1 - t2 * t.RH;
      const int t3 = t2 >> 2, j = t2 & 3;
      const int cc = t.div_G.div(t3), gg = t3 - cc * t.G;
      const int q = gg * 4 + j;
      const int n = s_n[q];
      const int ih = s_oh0[q] * a.stride - a.pad + r, iw = iw0 + c;
      float v = 0.f;
      if (n >= 0 && static_cast<unsigned>(ih) < static_cast<unsigned>(a.H) &&
          static_cast<unsigned>(iw) < static_cast<unsigned>(a.W))
        v = load_act(x + ((static_cast<size_t>(n) * a.C + c0 + cc) * a.H + ih) * a.W + iw);
      s_in_f[((((cc * t.G + gg) * t.RH + r) * t.RW + c) << 2) + j] = v;
    }
    // Stage each row's nonzeros of this chunk (columns are sorted, so they form a prefix).
    const int col_end = (c0 + ccn) * KK;
    for (int i = warp; i < R; i += nwarps) {
      const int row = s_row[i];
      int cur = s_cur[i], cnt = 0;
      const int end = s_end[i];
      if (row >= 0) {
        while (true) {
          const int k = cur + lane;
          const int col = k < end ? load_col(a, k) : INT_MAX;
          const bool in = col < col_end;
          const unsigned m = __ballot_sync(0xffffffffu, in);
          if (in) {
            const int ci = t.div_KK.div(col), rem = col - ci * KK;
            const int kh = t.div_KW.div(rem), kw = rem - kh * a.KW;
            Entry en;
            en.w = decode_value(a, row, k);
            en.off = ((ci - c0) * t.G * t.RH + kh) * t.RW + kw;
            s_w[i * t.cap + cnt + lane] = en;
          }
          const int nin = __popc(m);
          cnt += nin;
          cur += nin;
          if (nin < 32) break;
        }
      }
      if (lane == 0) {
        s_cnt[i] = cnt;
        s_cur[i] = cur;
      }
    }
    __syncthreads();
    if (active) {
      const float4* in4 = s_in + base;
#pragma unroll
      for (int i = 0; i < R; ++i) {
        const int n = s_cnt[i];
        const Entry* e = s_w + i * t.cap;
#pragma unroll 4
        for (int k = 0; k < n; ++k) {
          const Entry en = e[k];
          const float4 v = in4[en.off];
          acc[i][0] = fmaf(en.w, v.x, acc[i][0]);
          acc[i][1] = fmaf(en.w, v.y, acc[i][1]);
          acc[i][2] = fmaf(en.w, v.z, acc[i][2]);
          acc[i][3] = fmaf(en.w, v.w, acc[i][3]);
        }
      }
    }
    __syncthreads();
  }

  if (!active) return;
  T* __restrict__ out = static_cast<T*>(a.out);
  const int ow = ow0 + tb;
#pragma unroll
  for (int i = 0; i < R; ++i) {
    const int row = s_row[i];
    if (row < 0) continue;
    const float b = a.bias ? __ldg(a.bias + row) : 0.f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int q = g * 4 + j;
      const int n = s_n[q];
      const int oh = s_oh0[q] + ta;
      if (n >= 0 && oh < a.OH && ow < a.OW) {
        float v = acc[i][j] + b;
        if (a.relu) v = v < 0.f ? 0.f : v;  // keeps NaN, like torch.relu
        out[((static_cast<size_t>(n) * a.CO + row) * a.OH + oh) * a.OW + ow] = from_f32<T>(v);
      }
    }
  }
}

template <typename T, int R>
std::string launch_tile_t(const ConvArgs& a, const TileCfg& t, const Plan& p, cudaStream_t stream) {
  auto kernel = conv_tile_kernel<T, R>;
  if (p.smem_bytes > 48 * 1024) {
    // Not a stream operation, so it is legal during graph capture.
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(p.smem_bytes));
    if (e != cudaSuccess) return std::string("cudaFuncSetAttribute: ") + cudaGetErrorString(e);
  }
  const dim3 grid(static_cast<unsigned>((t.total_slots + 4 * t.G - 1) / (4 * t.G)),
                  static_cast<unsigned>((a.OW + t.TW - 1) / t.TW), static_cast<unsigned>((a.CO + R - 1) / R));
  kernel<<<grid, p.threads, p.smem_bytes, stream>>>(a, t);
  return "";
}

template <typename T>
std::string launch_tile_rows(const ConvArgs& a, const TileCfg& t, const Plan& p, cudaStream_t s) {
  return p.rows_per_block == 16 ? launch_tile_t<T, 16>(a, t, p, s) : launch_tile_t<T, 4>(a, t, p, s);
}

std::string launch_tile(const ConvArgs& a, const TileCfg& t, const Plan& p, cudaStream_t s) {
  switch (a.act_dtype) {
    case kF32: return launch_tile_rows<float>(a, t, p, s);
    case kF16: return launch_tile_rows<__half>(a, t, p, s);
    default: return launch_tile_rows<__nv_bfloat16>(a, t, p, s);
  }
}

}  // namespace sparsebench
