// Launch-time descriptions of the kernels' blocking (filled by the dispatcher) and launchers.
#pragma once
#include <cuda_runtime.h>

#include <string>

#include "common.cuh"

namespace sparsebench {

// Lets `kernel` launch with `bytes` of dynamic shared memory (over 48 KB needs the opt-in); "" or the error. Not a
// stream operation, so it is legal during graph capture.
template <typename Kernel>
std::string allow_dynamic_smem(Kernel kernel, int64_t bytes) {
  if (bytes <= 48 * 1024) return "";
  const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  return e == cudaSuccess ? "" : std::string("cudaFuncSetAttribute: ") + cudaGetErrorString(e);
}

// Staged kernel: a block owns a tile of NI images x TH x TW output pixels (32*V of them) and a
// group of RG output channels; the input tile for CC channels at a time sits in shared memory.
struct StageCfg {
  int V, TH, TW, NI, RH, RW, CC, chunks, RG, tiles_w, tiles_h;
  int TWv;    // lanes per tile row: TW, or RW when lanes also sweep the halo columns (no bank conflicts)
  int stage;  // floats per staged channel: NI * RH * RW
  int xs;     // floats reserved for the staged input (CC * stage, rounded up to 4)
  bool linear;  // stride 1, one image, TWv == RW: lane pixels sit 32 floats apart in the staged rows
  FastDiv div_RW, div_RH, div_NI, div_KK, div_KW, div_TWv, div_THTWv, div_tiles_w, div_tiles_h;
};

constexpr int kStageWarps = 16;

std::string launch_stage(const ConvArgs& a, const StageCfg& t, const Plan& p, cudaStream_t stream);

// Tensor-core kernel blocking (conv_tensor.cuh). The block's output tile is NB bands x TH output
// rows x TWp columns: a band holds P images side by side (P > 1 for narrow images) or one image's
// column tile [ow0, ow0 + OWv). Pixels go in groups of 8 consecutive columns (NC per tile row).
// The staged input is CC channels x KW column-shifted copies x NB*RH rows x PITCH 16-byte units.
struct TensorCfg {
  int P, OWv, TWp, NC, PITCH, TH, NB, RH, CSTRIDE, CC, chunks, PG;
  int warps_m, warps_k, warps_g;
  int tiles_w, tiles_h, tiles_n;
  int zero_unit;  // a 16-byte unit of zeros: the row masked taps read
  int ring;       // byte offset of the warps' weight rings (tensor_stages k-steps each, ring_stage bytes a step)
  int ring_stage; // bytes of one k-step in a ring: 32 lanes' weights (with tc_pairs = G, G groups' and their
                  // metadata), then its 16 (32) taps; a 16-byte multiple
  int channel_pairs;  // > 0: channels_last staged by stage_channel_pairs, CC / 2 pairs of channels a chunk
  FastDiv div_NC, div_RH, div_NB, div_OW, div_TH, div_CC, div_channel_pairs, div_tiles_w, div_tiles_h;
};

constexpr int kTensorWarps = 8;
constexpr int kWindowKW = 7;  // widest kernel the staging's sliding window serves
// k-steps each warp has in flight (weights and taps, by cp.async): fewer where a step serves several groups
// (its bytes grow with them, and so does the work that hides the next step's latency).
__host__ __device__ constexpr int tensor_stages(int pair_groups) { return pair_groups >= 2 ? 4 : 8; }

std::string launch_tensor(const ConvArgs& a, const TensorCfg& t, int MT, int64_t smem_bytes, cudaStream_t stream);
// One activation dtype (__half, __nv_bfloat16) and MT of launch_tensor: conv_tensor.cuh, instantiated
// once per pair by a generated file (conv_tensor_inst.cu.in).
template <typename T, int MT>
std::string launch_tensor_mt(const ConvArgs& a, const TensorCfg& t, int64_t smem_bytes, cudaStream_t stream);
std::string launch_rowsplit(const ConvArgs& a, int warps_per_row, cudaStream_t stream);

// Implicit-GEMM kernel (conv_gemm.cu) on the split stream: out[pixel][channel] over K = KH*KW*C taps in
// (kh, kw, ci) order, channels_last. A block of WM x WN warps computes 64 * WM channels (4 groups a warp) x
// 8 * NT * WN pixels (NT n8 tiles a warp).
// The wgmma kernel (conv_wgmma.cu, mma not kMmaSync): WM warpgroups of 64 channels x 8 * NT pixels, WN = 1.
struct GemmCfg {
  int WM, WN, NT;
  GemmMma mma;
  int M;              // output pixels, N * OH * OW
  int K;              // taps, KH * KW * C
  int steps;          // k-steps of kPairK taps: ceil(K / 32)
  int stream_groups;  // groups a k-step of the stream holds: the tiles' groups rounded up to 8
  FastDiv div_OHOW, div_OW, div_C, div_KW;
};
// Bytes of one group's k-step in the split stream: its two 2:4 halves' values (32 lanes x 16 bytes each), then 32
// lanes' two metadata words. Lanes 4g + 2 and 4g + 3 hold no metadata (selector 0); lane 2's first word is 1 where
// the second half has a nonzero, lane 3's where that of any group of the aligned four (a wgmma's 64 channels) has.
constexpr int kSplitRecord = 1280;
constexpr int kRecordA2 = 512;                  // the second half's values
constexpr int kRecordMeta = 1024;               // the lanes' metadata words (first half, second half)
constexpr int kRecordFlag = kRecordMeta + 16;   // lane 2's first word
constexpr int kRecordFlag4 = kRecordMeta + 24;  // lane 3's first word
constexpr int kGemmStages = 4;  // k-steps in flight (pixels and weights, by cp.async)
__host__ __device__ constexpr int gemm_stage_bytes(int WM, int WN, int NT) { return 8 * NT * WN * 64 + 4 * WM * kSplitRecord; }
std::string launch_gemm(const ConvArgs& a, const GemmCfg& t, cudaStream_t stream);
constexpr int kWgmmaStages = 4;  // the wgmma kernel's pixel stages: one being read, 3 k-steps in flight
// Its dynamic shared memory for N pixels a block: the stages, and room to align them to 1024 bytes.
__host__ __device__ constexpr int wgmma_smem_bytes(int N) { return kWgmmaStages * N * 64 + 1024; }
#ifdef SPARSEBENCH_WGMMA
std::string launch_wgmma(const ConvArgs& a, const GemmCfg& t, cudaStream_t stream);
#endif

// Row-split kernel blocking: warps per block (1, 2 or 4 of them per row) and output pixels per warp.
constexpr int kRowSplitWarps = 4;
constexpr int kRowSplitPixels = 16;

// Row-split: a warp's 16 pixels are contiguous in memory and inside one image (a 1x1 conv on
// image rows, stride 1, no padding; one image with H*W a multiple of 4, or images of a multiple
// of 16 pixels), so they can be read as 4 vector loads where x is 16-byte aligned.
inline bool contiguous_pixels(const ConvArgs& a) {
  return a.KH == 1 && a.KW == 1 && a.stride == 1 && a.pad == 0 && a.H == 1 &&
         ((a.N == 1 && a.W % 4 == 0) || a.W % kRowSplitPixels == 0);
}

}  // namespace sparsebench
