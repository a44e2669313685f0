// Direct sparse convolution, input-stationary: one block = a tile of 32*V output pixels x a
// group of RG output channels. The input tile (halo and zero padding included) is staged in
// shared memory CC channels at a time and then reused by every row of the group: each warp
// walks its rows, decodes 32 of a row's nonzeros at a time (one per lane: column -> shared
// offset, code -> fp32 value) into a per-warp buffer, and every lane then does V FMAs per
// nonzero against its own pixels (one broadcast + V conflict-free shared loads). The next 32
// nonzeros' loads are in flight meanwhile; fp32 input is staged with cp.async.
// Partial sums across chunks live in shared memory; with one chunk they never leave registers.
// When a tile row is narrower than a warp, lanes sweep the halo columns too (TWv = RW) and
// discard those outputs: a warp then reads 32 consecutive words, free of bank conflicts.
#include <climits>
#include <type_traits>

#include "kernels.cuh"

namespace sparsebench {

namespace {

struct __align__(8) Entry {
  float w;
  int off;  // byte offset of the tap inside the staged chunk
};

}  // namespace

// LINEAR: a lane's V staged pixels are 32 floats apart (stride 1, one image, lanes spanning whole
// staged rows: TWv == RW), so each of its V loads is one base register plus a constant.
template <typename T, int V, bool LINEAR>
__global__ void __launch_bounds__(kStageWarps * 32, 2) conv_stage_kernel(const ConvArgs a, const StageCfg t) {
  constexpr int NT = kStageWarps * 32;
  constexpr int PT = 32 * V;
  extern __shared__ float4 smem4[];
  float* s_x = reinterpret_cast<float*>(smem4);
  float* s_acc = s_x + t.xs;
  Entry* s_ent = reinterpret_cast<Entry*>(s_acc + (t.chunks > 1 ? t.RG * PT : 0));
  int* s_cur = reinterpret_cast<int*>(s_ent + kStageWarps * 32);  // per row: next nonzero,
  int* s_end = s_cur + t.RG;                                       // its end,
  int* s_row = s_end + t.RG;                                       // and which row it is

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const T* __restrict__ x = static_cast<const T*>(a.x);

  // Which tile: (image group, row band, column band).
  const int bw = t.div_tiles_w.div(blockIdx.x);
  const int tw_i = blockIdx.x - bw * t.tiles_w;
  const int tn_i = t.div_tiles_h.div(bw);
  const int th_i = bw - tn_i * t.tiles_h;
  const int ow0 = tw_i * t.TW, oh0 = th_i * t.TH, n0 = tn_i * t.NI;
  const int rg0 = blockIdx.y * t.RG;
  const int nrows = min(t.RG, a.CO - rg0);
  const int OHW = a.OH * a.OW;

  int sbase[V], obase[V];
  bool valid[V];
#pragma unroll
  for (int v = 0; v < V; ++v) {
    const int pos = lane + 32 * v;
    const int img = t.div_THTWv.div(pos), rem = pos - img * t.TH * t.TWv;
    const int ta = t.div_TWv.div(rem), tb = rem - ta * t.TWv;
    const int n = n0 + img, oh = oh0 + ta, ow = ow0 + tb;
    valid[v] = img < t.NI && tb < t.TW && n < a.N && oh < a.OH && ow < a.OW;
    // LINEAR lanes past the tile read up to PT + KW - 1 floats past the staged input, into a pad
    // the dispatcher reserves for them (uninitialised; their results are discarded).
    sbase[v] = LINEAR ? pos : valid[v] ? (img * t.RH + ta * a.stride) * t.RW + tb * a.stride : 0;
    obase[v] = valid[v] ? n * a.CO * OHW + oh * a.OW + ow : 0;
  }
  for (int i = tid; i < nrows; i += NT) {
    const int row = block_row(a, rg0 + i);
    s_row[i] = row;
    s_cur[i] = __ldg(a.rowptr + row);
    s_end[i] = __ldg(a.rowptr + row + 1);
  }
  __syncthreads();  // the rows' cursors, read below before the first staging barrier
  // Each lane's pixels as byte addresses into the staged chunk: a tap is then one add away.
  const char* xb[V];
#pragma unroll
  for (int v = 0; v < V; ++v) xb[v] = reinterpret_cast<const char*>(s_x + sbase[v]);

  const int KK = a.KH * a.KW;
  const int ih_base = oh0 * a.stride - a.pad, iw_base = ow0 * a.stride - a.pad;
  Entry* ent = s_ent + warp * 32;
  int chunk = 0;
  for (int c0 = 0; c0 < a.C; c0 += t.CC, ++chunk) {
    // Each warp keeps the next 32 nonzeros it will apply in flight (column, value), across row
    // boundaries too: the loads of a row's first nonzeros overlap the staging or the previous row.
    // A warp's rows are always the same ones (i = warp + 16j), so their cursors are its own.
    int row = 0, end = 0, k = 0, col = INT_MAX;
    float w = 0.f;
    RowDecode rs;
    auto fetch = [&]() {
      col = k < end ? load_col(a, k) : INT_MAX;
      w = k < end ? decode_value(a, rs, k) : 0.f;
    };
    auto fetch_row = [&](int i) {
      row = s_row[i];
      end = s_end[i];
      k = s_cur[i] + lane;
      rs = row_decode(a, row);
      fetch();
    };
    if (warp < nrows) fetch_row(warp);

    const int ccn = min(t.CC, a.C - c0);
    // Stage [cc][img][r][c], zeros where the tile reaches past the image.
    const int total = ccn * t.stage;
    auto source = [&](int e, size_t& idx) {
      const int t1 = t.div_RW.div(e), c = e - t1 * t.RW;
      const int t2 = t.div_RH.div(t1), r = t1 - t2 * t.RH;
      const int cc = t.div_NI.div(t2), img = t2 - cc * t.NI;
      const int n = n0 + img, ih = ih_base + r, iw = iw_base + c;
      idx = ((static_cast<size_t>(n) * a.C + c0 + cc) * a.H + ih) * a.W + iw;
      return n < a.N && static_cast<unsigned>(ih) < static_cast<unsigned>(a.H) &&
             static_cast<unsigned>(iw) < static_cast<unsigned>(a.W);
    };
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    constexpr bool kAsyncCopy = std::is_same<T, float>::value;  // cp.async: sm_80 and newer
#else
    constexpr bool kAsyncCopy = false;
#endif
    if constexpr (kAsyncCopy) {
      // Asynchronous copies straight into shared memory: every one of them in flight at once.
      for (int e = tid; e < total; e += NT) {
        size_t idx = 0;
        const bool in = source(e, idx);
        const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(s_x + e));
        asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(in ? x + idx : x),
                     "r"(in ? 4 : 0) : "memory");
      }
      asm volatile("cp.async.wait_all;\n" ::: "memory");
    } else {
      // Converted to fp32 on the way: 8 loads in flight per thread before their stores.
      for (int e0 = tid; e0 < total; e0 += NT * 8) {
        float vals[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) {
          const int e = e0 + u * NT;
          size_t idx = 0;
          vals[u] = e < total && source(e, idx) ? load_act(x + idx) : 0.f;
        }
#pragma unroll
        for (int u = 0; u < 8; ++u) {
          const int e = e0 + u * NT;
          if (e < total) s_x[e] = vals[u];
        }
      }
    }
    __syncthreads();

    const int col_end = (c0 + ccn) * KK;
    const bool last = c0 + t.CC >= a.C;
    for (int i = warp; i < nrows; i += kStageWarps) {
      const int this_row = row;
      int cur = k - lane;
      float part[V];
#pragma unroll
      for (int v = 0; v < V; ++v) part[v] = 0.f;
      while (true) {
        const bool in = col < col_end;  // columns are sorted: the chunk's ones form a prefix
        const int nin = __popc(__ballot_sync(0xffffffffu, in));
        if (in) {
          const int ci = t.div_KK.div(col), rem = col - ci * KK;
          const int kh = t.div_KW.div(rem), kw = rem - kh * a.KW;
          ent[lane] = Entry{w, (((ci - c0) * t.NI * t.RH + kh) * t.RW + kw) * 4};
        }
        __syncwarp();
        if (nin == 32) {  // the row goes on: its next 32 nonzeros
          k += 32;
          fetch();
        } else if (i + kStageWarps < nrows) {  // the row ends in this chunk: the warp's next row
          fetch_row(i + kStageWarps);
        }
#pragma unroll 8
        for (int j = 0; j < nin; ++j) {
          const Entry e = ent[j];
#pragma unroll
          for (int v = 0; v < V; ++v) {
            const char* p = LINEAR ? xb[0] + e.off + 128 * v : xb[v] + e.off;
            part[v] = fmaf(e.w, *reinterpret_cast<const float*>(p), part[v]);
          }
        }
        __syncwarp();
        cur += nin;
        if (nin < 32) break;
      }
      if (lane == 0) s_cur[i] = cur;
      float* acc = s_acc + i * PT;
      if (t.chunks > 1 && chunk > 0) {
#pragma unroll
        for (int v = 0; v < V; ++v) part[v] += acc[lane + 32 * v];
      }
      if (!last) {
#pragma unroll
        for (int v = 0; v < V; ++v) acc[lane + 32 * v] = part[v];
      } else {
        const float b = a.bias ? __ldg(a.bias + this_row) : 0.f;
        T* __restrict__ out = static_cast<T*>(a.out);
#pragma unroll
        for (int v = 0; v < V; ++v) {
          if (valid[v]) {
            float y = part[v] + b;
            if (a.relu) y = y < 0.f ? 0.f : y;  // keeps NaN, like torch.relu
            out[obase[v] + this_row * OHW] = from_f32<T>(y);
          }
        }
      }
    }
    __syncthreads();  // s_x is overwritten by the next chunk
  }
}

template <typename T, int V, bool LINEAR>
static std::string launch_stage_t(const ConvArgs& a, const StageCfg& t, const Plan& p, cudaStream_t stream) {
  auto kernel = conv_stage_kernel<T, V, LINEAR>;
  const std::string err = allow_dynamic_smem(kernel, p.smem_bytes);
  if (!err.empty()) return err;
  const int tiles_n = (a.N + t.NI - 1) / t.NI;
  const dim3 grid(static_cast<unsigned>(t.tiles_w) * t.tiles_h * tiles_n, static_cast<unsigned>((a.CO + t.RG - 1) / t.RG));
  kernel<<<grid, kStageWarps * 32, p.smem_bytes, stream>>>(a, t);
  return "";
}

template <typename T, bool LINEAR>
static std::string launch_stage_v(const ConvArgs& a, const StageCfg& t, const Plan& p, cudaStream_t s) {
  switch (t.V) {
    case 1: return launch_stage_t<T, 1, LINEAR>(a, t, p, s);
    case 2: return launch_stage_t<T, 2, LINEAR>(a, t, p, s);
    default: return launch_stage_t<T, 4, LINEAR>(a, t, p, s);
  }
}

template <typename T>
static std::string launch_stage_l(const ConvArgs& a, const StageCfg& t, const Plan& p, cudaStream_t s) {
  return t.linear ? launch_stage_v<T, true>(a, t, p, s) : launch_stage_v<T, false>(a, t, p, s);
}

std::string launch_stage(const ConvArgs& a, const StageCfg& t, const Plan& p, cudaStream_t s) {
  switch (a.act_dtype) {
    case kF32: return launch_stage_l<float>(a, t, p, s);
    case kF16: return launch_stage_l<__half>(a, t, p, s);
    default: return launch_stage_l<__nv_bfloat16>(a, t, p, s);
  }
}

}  // namespace sparsebench
