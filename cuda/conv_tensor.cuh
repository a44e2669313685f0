// Tensor-core direct sparse convolution: fp16/bf16 activations, fp32 accumulation, mma.sync.
//
// As a GEMM, out[pixel][channel] = sum over taps of x[pixel][tap] * w[tap][channel], a tap being a
// flat column (ci*KH + kh)*KW + kw. Output channels come in groups of 16 (the format's tiles), and a
// group's condensed taps are the columns any of its 16 channels uses, padded to a multiple of 16:
// only those are computed, as dense m16n8k16 MMAs. A (16 pixels x 16 taps) comes from the staged
// input with one ldmatrix.trans per 16 pixels; B (16 taps x 8 channels, twice) is a lane's 8 weights
// of the k-step in fragment order, one global load (L1/L2-resident), decoded in registers when the
// stream holds codes (the value kind is a template parameter).
//
// A block owns a tile of output pixels (NB bands x TH rows x TWp columns, see TensorCfg) and
// warps_g groups (warps_g x G with the 2:4 stream of G groups a k-step). Its 8 warps split as warps_m (m16 tiles, MT each) x warps_k (k-steps of a group,
// summed through shared memory at the end) x warps_g (groups). The input is staged CC channels at a
// time; each channel is copied KW times, copy kw shifted by kw columns and subsampled by the stride,
// so 8 consecutive output columns read 16 aligned bytes at every tap, as ldmatrix needs. The unit
// (16 bytes) of channel cc, copy kw, band b, staged row r, column group c is
//   cc*CSTRIDE + (kw*NB*RH + b*RH + r)*PITCH + c,
// with PITCH and CSTRIDE odd, so the 8 taps of one ldmatrix matrix tend to fall in different banks.
// A k-step whose taps span two chunks runs in both, its taps outside the staged chunk reading a zero
// unit. Padding slots of a group (fewer than 16 channels) compute garbage that is never stored.
//
// With the 2:4 stream (G = ConvArgs::tc_pairs > 0) the roles turn: the weights are the sparse A of
// mma.sp.m16n8k32 (16 channels x 32 taps, at most two nonzeros a row in each chunk of four, stored as
// those and their positions), the pixels B (32 taps x 8 pixels, one ldmatrix.x4.trans, lane l at tap l).
// A k-step then serves G groups that share its taps: a warp multiplies each pixel tile it loads by G
// groups' weights, G MMAs a load.
#pragma once
#include <cstdint>

#include "kernels.cuh"
#include "mma.cuh"

namespace sparsebench {

namespace {

// ---- weight streams: a lane's 8 weights of one k-step ------------------------------------------
// For n-tile j (channels 8j + g of the group, g = lane / 4, q = lane % 4) the B fragment is
// b[j][0] = (k 2q, 2q+1) and b[j][1] = (k 2q+8, 2q+9). Value v = 4j + 2h + e of a lane is tap
// 2q + 8h + e of channel 8j + g; sparsebench/sparse/tiles.py writes the stream in that order.

// Values already in the activation dtype: 16 bytes a lane.
template <typename T>
struct HalfStream {
  using Raw = uint4;
  static constexpr bool kScaled = false;
  static constexpr int kLaneBytes = 16;
  const char* bytes;  // the stream: a k-step's lanes kLaneBytes apart (with SP after G - 1 groups' values)
  __device__ __forceinline__ void setup(const ConvArgs&, const int (&)[2]) {}
  __device__ __forceinline__ Raw read(const char* step, int lane) const {
    return *reinterpret_cast<const uint4*>(step + lane * kLaneBytes);
  }
  template <bool SP>
  __device__ __forceinline__ void decode(const Raw& r, uint32_t (&b)[2][2]) const {
    b[0][0] = r.x;
    b[0][1] = r.y;
    b[1][0] = r.z;
    b[1][1] = r.w;
  }
};

template <int BITS> struct CodeWord;
template <> struct CodeWord<8> {
  using type = uint2;
  static __device__ __forceinline__ uint64_t widen(uint2 w) { return (static_cast<uint64_t>(w.y) << 32) | w.x; }
};
template <> struct CodeWord<4> {
  using type = uint32_t;
  static __device__ __forceinline__ uint64_t widen(uint32_t w) { return w; }
};
template <> struct CodeWord<2> {
  using type = unsigned short;
  static __device__ __forceinline__ uint64_t widen(unsigned short w) { return w; }
};

// Codes, 8 * BITS bits a lane. Linear: B = code - zero_point, an integer exact in fp16 and bf16
// (|B| <= 255); the channel's scale is applied to the sum, in fp32.
template <typename T, int BITS, bool BOOK>
struct CodeStream {
  using Raw = typename CodeWord<BITS>::type;
  static constexpr bool kScaled = !BOOK;
  static constexpr int kLaneBytes = BITS;  // 8 codes
  const char* bytes;
  float zero[2];       // linear: each channel's zero point
  const float* lv[2];  // codebook: each channel's levels
  __device__ __forceinline__ void setup(const ConvArgs& a, const int (&ch)[2]) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int c = ch[j] < 0 ? 0 : ch[j];
      if (BOOK) {
        lv[j] = a.tc_codebook + c * a.tc_codebook_stride;
        zero[j] = 0.f;
      } else {
        zero[j] = static_cast<float>(__ldg(a.zero_point + c));
        lv[j] = nullptr;
      }
    }
  }
  __device__ __forceinline__ Raw read(const char* step, int lane) const {
    return *reinterpret_cast<const Raw*>(step + lane * kLaneBytes);
  }
  // SP: the 2:4 stream, whose value v belongs to row (v >> 1) & 1 (slot g or g + 8; else v >> 2).
  template <bool SP>
  __device__ __forceinline__ void decode(const Raw& r, uint32_t (&b)[2][2]) const {
    const uint64_t w = CodeWord<BITS>::widen(r);
    float f[8];
#pragma unroll
    for (int v = 0; v < 8; ++v) {
      const int code = static_cast<int>((w >> (BITS * v)) & ((1u << BITS) - 1));
      const int row = SP ? (v >> 1) & 1 : v >> 2;
      f[v] = BOOK ? __ldg(lv[row] + code) : static_cast<float>(code) - zero[row];
    }
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      b[j][0] = Mma<T>::pack(f[4 * j], f[4 * j + 1]);
      b[j][1] = Mma<T>::pack(f[4 * j + 2], f[4 * j + 3]);
    }
  }
};

__device__ __forceinline__ int tile_col(const ConvArgs& a, int k) {
  return a.tile_col_bits == 16 ? static_cast<int>(__ldg(static_cast<const uint16_t*>(a.tile_cols) + k))
                               : __ldg(static_cast<const int32_t*>(a.tile_cols) + k);
}

// Where pixel group pg (8 consecutive tile columns) of the tile lies: band, row, column group.
struct PixelGroup {
  int band, th, c;
};

__device__ __forceinline__ PixelGroup pixel_group(const TensorCfg& t, int pg) {
  PixelGroup p;
  const int r = t.div_NC.div(pg);
  p.c = pg - r * t.NC;
  p.band = t.div_TH.div(r);
  p.th = r - p.band * t.TH;
  return p;
}

// Image and output column of tile column `col` in `band`; the caller checks n < N and ow < OW.
__device__ __forceinline__ void tile_column(const ConvArgs& a, const TensorCfg& t, int n0, int ow0, int band, int col,
                                            int& n, int& ow) {
  if (t.P > 1) {
    const int slot = t.div_OW.div(col);
    ow = col - slot * a.OW;
    n = n0 + band * t.P + slot;
  } else {
    ow = ow0 + col;
    n = n0 + band;
  }
}

// The staging's window: w[j] = *(at + j * step) for the columns iw0 + j in [0, end), else 0; one unsigned
// compare a column. W: one channel's 2-byte element, or two channels' 4-byte word.
template <typename W>
__device__ __forceinline__ void load_window(W (&w)[8 + kWindowKW - 1], const W* __restrict__ at, int step, int iw0,
                                            int end) {
#pragma unroll
  for (int j = 0; j < 8 + kWindowKW - 1; ++j, at += step) {
    const bool in = static_cast<unsigned>(iw0 + j) < static_cast<unsigned>(end);
    w[j] = in ? __ldg(at) : static_cast<W>(0);
  }
}

// Copies input channels [c0, c0 + ccn) of the block's tile into shared memory (zeros outside the
// image), each as KW shifted copies. A thread builds the KW units of one (channel, band, row, column
// group). With stride 1 their 8 + KW - 1 input columns are one window, each loaded once: one image a
// band, or images side by side whose output is as wide as their input (OW == W), so the window runs
// on from one image into the next and each element keeps only its own image's columns. NCHW:
// consecutive threads take consecutive column groups of a row; NHWC: consecutive channels (coalesced
// either way).
template <typename T>
__device__ __forceinline__ void stage_input(const ConvArgs& a, const TensorCfg& t, uint4* smem, int c0, int ccn,
                                            int n0, int oh0, int ow0) {
  const unsigned short* __restrict__ x = static_cast<const unsigned short*>(a.x);
  const bool nhwc = a.layout == kNHWC;
  const int units = (nhwc ? t.CC : ccn) * t.NB * t.RH * t.NC;
  const int ih0 = oh0 * a.stride - a.pad;
  const bool window = a.stride == 1 && a.KW <= kWindowKW && (t.P == 1 || a.OW == a.W);
  const int kw_rows = t.NB * t.RH;
  for (int e = threadIdx.x; e < units; e += kTensorWarps * 32) {
    int cc = 0, rest = e;
    if (nhwc) {
      rest = t.div_CC.div(e);
      cc = e - rest * t.CC;
      if (cc >= ccn) continue;
    }
    const int t1 = t.div_NC.div(rest), c = rest - t1 * t.NC;
    const int t2 = t.div_RH.div(t1), r = t1 - t2 * t.RH;
    const int t3 = t.div_NB.div(t2), band = t2 - t3 * t.NB;
    if (!nhwc) cc = t3;
    const int ih = ih0 + r;
    const bool row_in = static_cast<unsigned>(ih) < static_cast<unsigned>(a.H);
    uint4* dst = smem + cc * t.CSTRIDE + (band * t.RH + r) * t.PITCH + c;
    // Element (n, channel c0 + cc, ih, iw) is at row_base(n) + iw * col_step.
    auto row_base = [&](int n) -> int64_t {
      return nhwc ? (static_cast<int64_t>(n) * a.H + ih) * a.W * a.C + c0 + cc
                  : ((static_cast<int64_t>(n) * a.C + c0 + cc) * a.H + ih) * a.W;
    };
    const int col_step = nhwc ? a.C : 1;  // a row of one channel spans < 2^31 elements
    auto pack = [](const unsigned short (&v)[8]) {
      return make_uint4(v[0] | (static_cast<uint32_t>(v[1]) << 16), v[2] | (static_cast<uint32_t>(v[3]) << 16),
                        v[4] | (static_cast<uint32_t>(v[5]) << 16), v[6] | (static_cast<uint32_t>(v[7]) << 16));
    };
    if (window && t.P == 1) {  // w[j]: input column ow0 + 8c + j - pad of the band's image
      const int n = n0 + band;
      const bool live = row_in && n < a.N;
      const unsigned short* __restrict__ row = x + (live ? row_base(n) : 0);
      const int iw0 = ow0 + 8 * c - a.pad;
      // Columns [iw0, end) are loaded: inside the image and the window.
      const int end = live ? max(0, min(a.W, iw0 + 7 + a.KW)) : 0;
      unsigned short w[8 + kWindowKW - 1];
      if (nhwc) {  // a running pointer, a channel count apart
        load_window(w, row + iw0 * col_step, col_step, iw0, end);
      } else {  // one base pointer, the columns at fixed offsets from it
        const unsigned short* __restrict__ at = row + iw0;
#pragma unroll
        for (int j = 0; j < 8 + kWindowKW - 1; ++j) {
          const bool in = static_cast<unsigned>(iw0 + j) < static_cast<unsigned>(end);
          w[j] = in ? __ldg(at + j) : static_cast<unsigned short>(0);
        }
      }
#pragma unroll
      for (int kw = 0; kw < kWindowKW; ++kw) {
        if (kw >= a.KW) break;
        unsigned short v[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = w[i + kw];
        dst[kw * kw_rows * t.PITCH] = pack(v);
      }
      continue;
    }
    if (window) {
      // Side by side: w[j] is the input under tile column 8c + j - pad, the columns running on from
      // one image (slot) into the next; element i (output column ow_i of its image) keeps tap kw only
      // inside its own image.
      const int first = 8 * c - a.pad;
      int slot = 0, iw = first;
      if (first > 0) {
        slot = t.div_OW.div(first);
        iw = first - slot * a.OW;
      }
      const int nb = n0 + band * t.P;
      unsigned short w[8 + kWindowKW - 1];
#pragma unroll
      for (int j = 0; j < 8 + kWindowKW - 1; ++j) {
        const int n = nb + slot;
        const bool in = row_in && j < 7 + a.KW && slot < t.P && n < a.N &&
                        static_cast<unsigned>(iw) < static_cast<unsigned>(a.W);
        w[j] = in ? __ldg(x + row_base(n) + iw * col_step) : static_cast<unsigned short>(0);
        if (++iw == a.OW) {
          iw = 0;
          ++slot;
        }
      }
      int ow_i[8];
      ow_i[0] = 8 * c - static_cast<int>(t.div_OW.div(8 * c)) * a.OW;
#pragma unroll
      for (int i = 1; i < 8; ++i) ow_i[i] = ow_i[i - 1] + 1 == a.OW ? 0 : ow_i[i - 1] + 1;
#pragma unroll
      for (int kw = 0; kw < kWindowKW; ++kw) {
        if (kw >= a.KW) break;
        unsigned short v[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const bool own = static_cast<unsigned>(ow_i[i] + kw - a.pad) < static_cast<unsigned>(a.W);
          v[i] = own ? w[i + kw] : static_cast<unsigned short>(0);
        }
        dst[kw * kw_rows * t.PITCH] = pack(v);
      }
      continue;
    }
    for (int kw = 0; kw < a.KW; ++kw) {
      unsigned short v[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        int n, ow;
        tile_column(a, t, n0, ow0, band, c * 8 + i, n, ow);
        const int iw = ow * a.stride + kw - a.pad;
        const bool in = row_in && n < a.N && static_cast<unsigned>(iw) < static_cast<unsigned>(a.W);
        v[i] = in ? __ldg(x + row_base(n) + iw * col_step) : static_cast<unsigned short>(0);
      }
      dst[kw * kw_rows * t.PITCH] = pack(v);
    }
  }
}

// stage_input for channels_last, stride 1, one image a band, C and CC even (TensorCfg::channel_pairs): a thread
// stages 2 consecutive channels of one (band, row, column group). Its window of 8 + KW - 1 input columns is
// one 4-byte load a column (both channels of a pixel), split into the two channels' KW units by byte
// permutes: half the loads of stage_input, and half its threads' index arithmetic.
__device__ __forceinline__ void stage_channel_pairs(const ConvArgs& a, const TensorCfg& t, uint4* smem, int c0,
                                                    int ccn, int n0, int oh0, int ow0) {
  const uint32_t* __restrict__ x = static_cast<const uint32_t*>(a.x);
  const int units = t.channel_pairs * t.NB * t.RH * t.NC;
  const int kw_rows = t.NB * t.RH, col_step = a.C / 2;  // a pixel's channels, in 4-byte words
  for (int e = threadIdx.x; e < units; e += kTensorWarps * 32) {
    // Consecutive threads stage consecutive pairs.
    const int rest = t.div_channel_pairs.div(e), p = e - rest * t.channel_pairs;
    if (2 * p >= ccn) continue;
    const int t1 = t.div_NC.div(rest), c = rest - t1 * t.NC;
    const int band = t.div_RH.div(t1), r = t1 - band * t.RH;
    const int ih = oh0 - a.pad + r, n = n0 + band, iw0 = ow0 + 8 * c - a.pad;
    const bool live = static_cast<unsigned>(ih) < static_cast<unsigned>(a.H) && n < a.N;
    // Columns [iw0, end) are loaded: inside the image and the window.
    const int end = live ? max(0, min(a.W, iw0 + 7 + a.KW)) : 0;
    uint32_t w[8 + kWindowKW - 1];
    load_window(w, x + (live ? ((static_cast<int64_t>(n) * a.H + ih) * a.W + iw0) * col_step + c0 / 2 + p : 0),
                col_step, iw0, end);
    uint4* dst = smem + 2 * p * t.CSTRIDE + (band * t.RH + r) * t.PITCH + c;
#pragma unroll
    for (int kw = 0; kw < kWindowKW; ++kw) {
      if (kw >= a.KW) break;
#pragma unroll
      for (int k = 0; k < 2; ++k) {  // channel c0 + 2p + k: half k of each column's word
        const uint32_t half = k ? 0x7632 : 0x5410;  // the high or the low halves of two words
        dst[k * t.CSTRIDE + kw * kw_rows * t.PITCH] =
            make_uint4(__byte_perm(w[kw], w[kw + 1], half), __byte_perm(w[kw + 2], w[kw + 3], half),
                       __byte_perm(w[kw + 4], w[kw + 5], half), __byte_perm(w[kw + 6], w[kw + 7], half));
      }
    }
  }
}

// G > 0: the 2:4 stream (sparsebench/sparse/pairs.py) on mma.sp.m16n8k32: a k-step is 32 taps, the weights
// are A (16 channels x 32 taps, half of them stored) of each of G groups and the pixels B, one
// ldmatrix.x4.trans (32 taps x 8 pixels) and G MMAs per n8 pixel tile: the warp's 16 * MT pixels are 2 * MT
// such tiles. A warp's "group" is then G consecutive groups of the tiles.
template <typename T, int MT, int G, class Values>
__global__ void __launch_bounds__(kTensorWarps * 32) conv_tensor_kernel(const ConvArgs a, const TensorCfg t, Values vals0) {
  constexpr bool SP = G > 0;
  constexpr int NG = SP ? G : 1;             // groups a warp computes
  constexpr int kK = SP ? kPairK : kTileK;  // taps a k-step
  constexpr int kPix = SP ? 2 * MT : MT;   // ldmatrix a k-step: m16 tiles, or n8 tiles with SP
  constexpr int kStages = tensor_stages(G);
  extern __shared__ uint4 smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp % t.warps_m;
  const int warp_k = (warp / t.warps_m) % t.warps_k;
  const int warp_g = warp / (t.warps_m * t.warps_k);

  // The block's tile: (image group, row band, column band).
  const int bw = t.div_tiles_w.div(blockIdx.x);
  const int tw_i = blockIdx.x - bw * t.tiles_w;
  const int tn_i = t.div_tiles_h.div(bw);
  const int th_i = bw - tn_i * t.tiles_h;
  const int n0 = tn_i * t.NB * t.P, oh0 = th_i * t.TH, ow0 = tw_i * t.OWv;
  const int group = blockIdx.y * t.warps_g + warp_g;  // of NG groups
  const bool live = group * NG < a.groups;

  // This lane's ldmatrix row: tap 8*(lane/16) + lane%8 of the k-step, pixel half (lane/8)%2 of each m16
  // tile; with SP tap `lane` of the k-step, n8 tile i (pixel group 2 * warp_m * MT + i).
  const int tap_lane = SP ? lane : 8 * (lane >> 4) + (lane & 7);
  uint32_t pix[kPix];  // shared address of its first unit (channel 0, copy 0), set below
#pragma unroll
  for (int i = 0; i < kPix; ++i) {
    const int pg = SP ? 2 * warp_m * MT + i : 2 * (warp_m * MT + i) + ((lane >> 3) & 1);
    const PixelGroup p = pixel_group(t, pg < t.PG ? pg : 0);
    pix[i] = (p.band * t.RH + p.th * a.stride) * t.PITCH + p.c;
  }

  // A group's channel of slot s, -1 for a padding slot or a group past the last (the warp's NG may overhang).
  auto slot_channel = [&](int gi, int s) {
    const int gg = group * NG + gi;
    return gg < a.groups ? __ldg(a.tile_rows + gg * kTileRows + s) : -1;
  };
  Values vals[NG];
#pragma unroll
  for (int gi = 0; gi < NG; ++gi) {
    int bch[2];
#pragma unroll
    for (int j = 0; j < 2; ++j) bch[j] = slot_channel(gi, 8 * j + (lane >> 2));  // -1 past the last group: also when !live
    vals[gi] = vals0;
    vals[gi].setup(a, bch);
  }

  int s_cur = 0, s_last = 0;  // k-steps: tile_kptr is int32
  if (live) {
    s_cur = __ldg(a.tile_kptr + group) / kK;
    s_last = __ldg(a.tile_kptr + group + 1) / kK;
  }

  float acc[NG * MT][2][4];  // group gi's tiles at gi * MT
#pragma unroll
  for (int i = 0; i < NG * MT; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int v = 0; v < 4; ++v) acc[i][j][v] = 0.f;

  // A tap code is ci << 2*kb | kh << kb | kw (sparsebench.h): split with shifts and masks.
  const int kb = 32 - __clz(max(a.KH, a.KW) - 1), kmask = (1 << kb) - 1;
  uint32_t sbase = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("" : "+r"(sbase));  // keep it in a register: nvcc would rebuild it (an S2R) in the k-loop
#pragma unroll
  for (int i = 0; i < kPix; ++i) pix[i] = sbase + pix[i] * 16u;
  const uint32_t zero_addr = sbase + static_cast<uint32_t>(t.zero_unit) * 16u;
  const int kw_rows = t.NB * t.RH;
  if (tid == 0) smem[t.zero_unit] = make_uint4(0, 0, 0, 0);
  // This warp's ring of k-steps: the weights (b_bytes: NG groups' values of 32 lanes, then with SP their
  // metadata words), then the step's kK taps.
  char* ring = reinterpret_cast<char*>(smem) + t.ring + warp * kStages * t.ring_stage;
  const uint32_t ring_addr = sbase + static_cast<uint32_t>(t.ring + warp * kStages * t.ring_stage);
  // The ring starts zeroed: the step after a warp's last is read and decoded (never used) from a stage
  // no fetch may have written, and a codebook decode indexes memory with its codes (zero is a level).
  for (int q = lane; q < kStages * t.ring_stage / 16; q += 32) reinterpret_cast<uint4*>(ring)[q] = uint4{};
  __syncwarp();
  constexpr int v_bytes = 32 * Values::kLaneBytes;           // one group's values of a k-step
  constexpr int b_bytes = NG * (v_bytes + (SP ? 128 : 0));  // the k-step's weights: values, then metadata
  const int col_bytes = a.tile_col_bits / 8;
  const int b_units = b_bytes / 16, units = b_units + kK * col_bytes / 16;  // a k-step's 16-byte units
  constexpr int kFetch = (b_bytes / 16 + kK * 4 / 16 + 31) / 32;            // units a lane copies (taps <= 4 bytes)
  const char* cols = static_cast<const char*>(a.tile_cols);

  for (int chunk = 0, c0 = 0; chunk < t.chunks; ++chunk, c0 += t.CC) {
    const int ccn = min(t.CC, a.C - c0);
    if (chunk) __syncthreads();  // every warp is done with the previous chunk
    if (t.channel_pairs)
      stage_channel_pairs(a, t, smem, c0, ccn, n0, oh0, ow0);
    else
      stage_input<T>(a, t, smem, c0, ccn, n0, oh0, ow0);
    __syncthreads();
    if (!live) continue;
    const int col_hi = (c0 + ccn) << (2 * kb);  // the first code of the next chunk's channels
    // This chunk's k-steps are [s_cur, s_stop): those whose first tap lies before col_hi.
    int s_stop = s_cur;
    for (;;) {
      const int s = s_stop + lane;
      const bool beyond = s >= s_last || tile_col(a, s * kK) >= col_hi;
      const unsigned m = __ballot_sync(0xffffffffu, beyond);
      if (m) {
        s_stop += __ffs(m) - 1;
        break;
      }
      s_stop += 32;
    }
    // Each warp keeps its next kStages - 1 k-steps (weights and taps) in flight into its ring: a step is
    // `units` 16-byte units, lane l copies units l, l + 32, ..., each from the step's weights or its taps.
    const int s0 = s_cur + warp_k;
    int f_step = s0;
    const uint32_t lane_dst = ring_addr + lane * 16;
    auto fetch = [&](int stage) {
      if (f_step < s_last) {
        const char* w_src = vals0.bytes + static_cast<int64_t>(f_step) * b_bytes;
        const char* c_src = cols + static_cast<int64_t>(f_step) * (kK * col_bytes);
#pragma unroll
        for (int h = 0; h < kFetch; ++h) {
          const int q = lane + 32 * h;
          if (q < units)
            cp_async16(lane_dst + stage * t.ring_stage + 512 * h, q < b_units ? w_src + q * 16 : c_src + (q - b_units) * 16);
        }
      }
      cp_async_commit();
      f_step += t.warps_k;
    };
#pragma unroll
    for (int d = 0; d < kStages - 1; ++d) fetch(d);
    // A step's weights and tap are read from the ring and decoded one step ahead, so those shared
    // loads and the decode overlap the MMAs of the step before. Past the chunk's last step they read
    // a stale stage, never used.
    typename Values::Raw raw[NG];
    int col;
    uint32_t meta_next[NG] = {}, meta[NG] = {};
    auto read_step = [&](int stage) {  // the step in `stage` has landed: at most kStages - 2 pending
      cp_async_wait<kStages - 2>();
      __syncwarp();
      const char* here = ring + stage * t.ring_stage;
#pragma unroll
      for (int gi = 0; gi < NG; ++gi) {
        raw[gi] = vals[gi].read(here + gi * v_bytes, lane);
        if (SP) meta_next[gi] = reinterpret_cast<const uint32_t*>(here + NG * v_bytes)[32 * gi + lane];
      }
      col = col_bytes == 2 ? static_cast<int>(reinterpret_cast<const uint16_t*>(here + b_bytes)[tap_lane])
                           : reinterpret_cast<const int32_t*>(here + b_bytes)[tap_lane];
      __syncwarp();  // every lane has read the stage before a later fetch refills it
    };
    uint32_t b[NG][2][2], tap;
    bool in;
    auto decode_step = [&]() {
      const int cc = (col >> (2 * kb)) - c0, kh = (col >> kb) & kmask, kw = col & kmask;
      in = static_cast<unsigned>(cc) < static_cast<unsigned>(ccn);
      tap = static_cast<uint32_t>(cc * t.CSTRIDE + (kw * kw_rows + kh) * t.PITCH) * 16u;
#pragma unroll
      for (int gi = 0; gi < NG; ++gi) {
        vals[gi].template decode<SP>(raw[gi], b[gi]);
        meta[gi] = meta_next[gi];
      }
    };
    read_step(0);
    decode_step();
    int stage = 0;
#pragma unroll 2
    for (int s = s0; s < s_stop; s += t.warps_k) {
      uint32_t af[kPix][4];
#pragma unroll
      for (int i = 0; i < kPix; ++i) ldmatrix_x4_trans(af[i], in ? pix[i] + tap : zero_addr);
      // Refill the stage of the step before this one (read two read_steps ago), then read the next step.
      fetch(stage == 0 ? kStages - 1 : stage - 1);
      stage = stage == kStages - 1 ? 0 : stage + 1;
      read_step(stage);
      if constexpr (SP) {
#pragma unroll
        for (int gi = 0; gi < NG; ++gi) {
          const uint32_t w[4] = {b[gi][0][0], b[gi][0][1], b[gi][1][0], b[gi][1][1]};
#pragma unroll
          for (int i = 0; i < MT; ++i)
#pragma unroll
            for (int j = 0; j < 2; ++j) Mma<T>::run_sp(acc[gi * MT + i][j], w, af[2 * i + j], meta[gi]);
        }
      } else {
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) Mma<T>::run(acc[i][j], af[i], b[0][j][0], b[0][j][1]);
      }
      decode_step();
    }
    cp_async_wait<0>();  // no copy may land in the ring after the loop (the next chunk refills it)
    __syncwarp();
    // A step whose last tap lies past this chunk runs again in the next, for its other taps.
    s_cur = s_stop > s_cur && tile_col(a, s_stop * kK - 1) >= col_hi ? s_stop - 1 : s_stop;
  }

  if (t.warps_k > 1) {  // the warps of one group and m-range add their partial sums, in warp order
    __syncthreads();    // the staged input is no longer read: its space holds the partial sums
    float* red = reinterpret_cast<float*>(smem);
    if (warp_k > 0) {
#pragma unroll
      for (int i = 0; i < NG * MT; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
          for (int v = 0; v < 4; ++v) red[((warp * NG * MT + i) * 8 + j * 4 + v) * 32 + lane] = acc[i][j][v];
    }
    __syncthreads();
    if (warp_k > 0) return;
    for (int k = 1; k < t.warps_k; ++k) {
      const int other = warp + k * t.warps_m;
#pragma unroll
      for (int i = 0; i < NG * MT; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
          for (int v = 0; v < 4; ++v) acc[i][j][v] += red[((other * NG * MT + i) * 8 + j * 4 + v) * 32 + lane];
    }
  }
  if (!live) return;

  // Epilogue. Accumulator v of (gi * MT + i, j): without SP pixel row g + 8*(v/2) of m16 tile i, channel
  // slot 8j + 2q + v%2; with SP pixel 2q + v%2 of n8 tile 2i + j, channel slot g + 8*(v/2) of group gi. A
  // lane writes kLanePx pixels of each i, kLaneCh channels of each group each.
  const int g = lane >> 2, q = lane & 3;
  constexpr int kLanePx = SP ? 4 : 2, kLaneCh = SP ? 2 : 4;
  int ch[NG][kLaneCh];
  float bias[NG][kLaneCh], scale[NG][kLaneCh];
#pragma unroll
  for (int gi = 0; gi < NG; ++gi)
#pragma unroll
    for (int k = 0; k < kLaneCh; ++k) {
      const int c = slot_channel(gi, SP ? g + 8 * k : 8 * (k >> 1) + 2 * q + (k & 1));
      ch[gi][k] = c;
      bias[gi][k] = c >= 0 && a.bias ? __ldg(a.bias + c) : 0.f;
      scale[gi][k] = c >= 0 && Values::kScaled ? __ldg(a.scale + c) : 1.f;
    }
  T* __restrict__ out = static_cast<T*>(a.out);
  const bool nhwc = a.layout == kNHWC;
  const int64_t ch_stride = nhwc ? 1 : static_cast<int64_t>(a.OH) * a.OW;
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int x = 0; x < kLanePx; ++x) {
      const int pg = 2 * (warp_m * MT + i) + (SP ? x >> 1 : x);
      if (pg >= t.PG) continue;
      const PixelGroup p = pixel_group(t, pg);
      const int col = p.c * 8 + (SP ? 2 * q + (x & 1) : g);
      int n, ow;
      tile_column(a, t, n0, ow0, p.band, col, n, ow);
      const int oh = oh0 + p.th;
      if (n >= a.N || oh >= a.OH || ow >= a.OW || (t.P > 1 && col >= t.OWv)) continue;
      const int64_t base = nhwc ? ((static_cast<int64_t>(n) * a.OH + oh) * a.OW + ow) * a.CO
                                : static_cast<int64_t>(n) * a.CO * ch_stride + static_cast<int64_t>(oh) * a.OW + ow;
#pragma unroll
      for (int gi = 0; gi < NG; ++gi)
#pragma unroll
        for (int k = 0; k < kLaneCh; ++k) {
          if (ch[gi][k] < 0) continue;
          const float v = SP ? acc[gi * MT + i][x >> 1][2 * k + (x & 1)] : acc[i][k >> 1][2 * x + (k & 1)];
          float y = v * scale[gi][k] + bias[gi][k];
          if (a.relu) y = y < 0.f ? 0.f : y;  // keeps NaN, like torch.relu
          out[base + ch[gi][k] * ch_stride] = from_f32<T>(y);
        }
    }
}

// The kernel for the call's stream: dense MMAs (G = 0), or the 2:4 stream of G groups a k-step; MT x G is at
// most kMaxPairTiles (the planner's rule), so only those are built.
template <typename T, int MT, class Values>
auto pick_kernel(int G) -> decltype(&conv_tensor_kernel<T, MT, 0, Values>) {
  switch (G) {
    case 0: return conv_tensor_kernel<T, MT, 0, Values>;
    case 1: return conv_tensor_kernel<T, MT, 1, Values>;
    case 2:
      if constexpr (MT * 2 <= kMaxPairTiles) return conv_tensor_kernel<T, MT, 2, Values>;
      return nullptr;
    case 4:
      if constexpr (MT * 4 <= kMaxPairTiles) return conv_tensor_kernel<T, MT, 4, Values>;
      return nullptr;
    default: return nullptr;
  }
}

template <typename T, int MT, class Values>
std::string launch_values(const ConvArgs& a, const TensorCfg& t, const Values& vals, int64_t smem_bytes,
                          cudaStream_t stream) {
  auto kernel = pick_kernel<T, MT, Values>(a.tc_pairs);
  if (!kernel) return "tensor-core kernels: no kernel for tc_pairs " + std::to_string(a.tc_pairs) + " with MT " + std::to_string(MT);
  const std::string err = allow_dynamic_smem(kernel, smem_bytes);
  if (!err.empty()) return err;
  const dim3 grid(static_cast<unsigned>(t.tiles_w) * t.tiles_h * t.tiles_n,
                  static_cast<unsigned>((warp_group_count(a.groups, a.tc_pairs) + t.warps_g - 1) / t.warps_g));
  kernel<<<grid, kTensorWarps * 32, smem_bytes, stream>>>(a, t, vals);
  return "";
}

template <typename T, int MT, int BITS>
std::string launch_codes(const ConvArgs& a, const TensorCfg& t, int64_t smem, cudaStream_t s) {
  if (a.tc_kind == kTcCodebook) {
    CodeStream<T, BITS, true> v{};
    v.bytes = static_cast<const char*>(a.tc_values);
    return launch_values<T, MT>(a, t, v, smem, s);
  }
  CodeStream<T, BITS, false> v{};
  v.bytes = static_cast<const char*>(a.tc_values);
  return launch_values<T, MT>(a, t, v, smem, s);
}

}  // namespace

// One activation dtype and MT: each of the eight is instantiated in a file of its own
// (conv_tensor_inst.cu.in), so they compile in parallel.
template <typename T, int MT>
std::string launch_tensor_mt(const ConvArgs& a, const TensorCfg& t, int64_t smem, cudaStream_t s) {
  if (a.tc_kind == kTcHalf) {
    HalfStream<T> v{};
    v.bytes = static_cast<const char*>(a.tc_values);
    return launch_values<T, MT>(a, t, v, smem, s);
  }
  switch (a.bits) {
    case 8: return launch_codes<T, MT, 8>(a, t, smem, s);
    case 4: return launch_codes<T, MT, 4>(a, t, smem, s);
    case 2: return launch_codes<T, MT, 2>(a, t, smem, s);
    default: return "tensor-core kernels: code streams take 2, 4 or 8 bits";
  }
}

}  // namespace sparsebench
