// Host-side interface of the sparsebench CUDA module: plain C++, no CUDA headers, so the
// pybind11 file compiles with the host compiler alone.
#pragma once
#include <cstdint>
#include <string>

namespace sparsebench {

enum ActDtype : int { kF32 = 0, kF16 = 1, kBF16 = 2 };
enum Layout : int { kNCHW = 0, kNHWC = 1 };
enum ValueKind : int { kValF32 = 0, kValF16 = 1, kValLinear = 2, kValCodebook = 3 };
enum Variant : int { kAuto = 0, kStage = 1, kRowSplit = 2, kTensor = 3 };
// How the tensor-core kernels read weights: their fragment stream holds either the values in the
// activation dtype (kTcHalf), or codes decoded in the kernel, linearly or through a codebook.
enum TcKind : int { kTcNone = -1, kTcHalf = 0, kTcLinear = 1, kTcCodebook = 2 };

// Output channels per tensor-core group: the N of two m16n8k16 MMAs. The format's tiles use it.
constexpr int kTileRows = 16;
// Condensed taps per k-step: the K of one m16n8k16 MMA.
constexpr int kTileK = 16;
// Taps per k-step of the 2:4 stream (tc_pairs): the K of one mma.sp.m16n8k32.
constexpr int kPairK = 32;
// tc_pairs: 0 for the dense-MMA stream, else the groups one k-step of the 2:4 stream serves (1, 2 or 4): a warp
// multiplies each pixel tile it loads by that many groups' weights. m16 tiles a warp (MT) times these groups is
// at most kMaxPairTiles. The errors that refuse another value quote kTcPairsAllowed.
// kTcSplit instead names the implicit-GEMM kernel's split stream (conv_gemm.cu, sparsebench/sparse/split.py).
constexpr int kTcSplit = 8;
constexpr bool valid_tc_pairs(int p) { return p == 0 || p == 1 || p == 2 || p == 4 || p == kTcSplit; }
constexpr const char* kTcPairsAllowed =
    "0 (the dense-MMA stream), 1, 2, 4 (the 2:4 stream of that many groups a k-step) or 8 (the split 2:4 stream "
    "of the implicit-GEMM kernel)";
constexpr int kMaxPairTiles = 8;
// How the implicit-GEMM kernels issue their MMAs (GemmTile::mma, Plan::wgmma).
enum GemmMma : int {
  kMmaSync = 0,          // conv_gemm.cu: mma.sync, each warp its four groups
  kWgmma = 1,            // conv_wgmma.cu (Hopper): wgmma for both 2:4 halves, the second where any of a warpgroup's
                         // four groups has one
  kWgmmaWarpSecond = 2,  // conv_wgmma.cu: wgmma for the first half, mma.sync for the second where the warp's group has one
};
// The implicit-GEMM kernels' block tiles (Tuning::tc_gemm_tile indexes them): output channels x pixels a block,
// pixels a warp, and the MMAs. With mma.sync a warp computes 64 channels (four groups), so a block has
// channels / 64 x pixels / warp_pixels warps; with wgmma a warpgroup computes 64 channels x all the block's pixels.
struct GemmTile {
  int channels, pixels, warp_pixels;
  GemmMma mma;
};
constexpr GemmTile kGemmTiles[] = {
    {128, 128, 32, kMmaSync},          {128, 64, 32, kMmaSync},           {64, 128, 32, kMmaSync},
    {64, 64, 32, kMmaSync},            {128, 128, 64, kMmaSync},          {64, 128, 64, kMmaSync},
    {128, 256, 64, kMmaSync},          {64, 128, 128, kWgmma},            {128, 128, 128, kWgmma},
    {64, 256, 256, kWgmma},            {128, 256, 256, kWgmma},           {64, 128, 128, kWgmmaWarpSecond},
    {128, 128, 128, kWgmmaWarpSecond}, {64, 256, 256, kWgmmaWarpSecond},  {128, 256, 256, kWgmmaWarpSecond}};
constexpr int kGemmTileCount = sizeof(kGemmTiles) / sizeof(kGemmTiles[0]);
// Warps' groups of a layer of `groups` groups: G groups each on the 2:4 stream of G groups a k-step, else one.
constexpr int warp_group_count(int groups, int pair_groups) {
  return pair_groups > 1 ? (groups + pair_groups - 1) / pair_groups : groups;
}

// One direct sparse convolution (a linear layer is the 1x1 case on a 1x1 image).
// x: [N, C, H, W] activations (NCHW, or NHWC memory with layout kNHWC); out: [N, CO, OH, OW] in the
// same dtype and layout; weights: CSR over CO for the CUDA-core kernels, tiles for the tensor-core ones.
struct ConvArgs {
  const void* x = nullptr;
  void* out = nullptr;
  int act_dtype = kF32;
  int layout = kNCHW;
  int N = 0, C = 0, H = 0, W = 0, CO = 0, KH = 1, KW = 1, stride = 1, pad = 0, OH = 0, OW = 0;
  // CSR (CUDA-core kernels).
  const int32_t* rowptr = nullptr;
  const void* colidx = nullptr;  // uint16 or int32, flat (ci*KH + kh)*KW + kw, sorted per row
  int col_bits = 16;
  const int32_t* row_order = nullptr;  // may be null: identity
  const void* values = nullptr;
  int value_kind = kValF32;
  int bits = 32;
  const float* scale = nullptr;
  const int32_t* zero_point = nullptr;
  const float* codebook = nullptr;
  int codebook_stride = 0;  // per-channel codebooks: row r's levels start at codebook + r * stride; 0: one codebook
  const float* bias = nullptr;  // may be null
  int relu = 0;
  // Tensor-core tiles (null tile_kptr: no tensor-core plan): groups of kTileRows output channels,
  // each with its condensed taps (the flat columns any of its channels uses), kTileK per k-step.
  const int32_t* tile_rows = nullptr;  // [groups * 16]: the output channel of each slot, -1 for none
  // [groups + 1] (the 2:4 stream of G groups a k-step: [ceil(groups / G) + 1]): each group's (G groups')
  // first tap, multiples of kTileK (kPairK)
  const int32_t* tile_kptr = nullptr;
  // [tile_kptr's last] each group's taps, ascending, as codes ci << 2b | kh << b | kw with b the bits
  // of the larger kernel side minus one (b = 0 for 1x1: the code is ci); uint16 or int32.
  const void* tile_cols = nullptr;
  int tile_col_bits = 16;
  int groups = 0;
  int64_t tile_steps = 0;              // tile_kptr's last / kTileK (kPairK) (a planning hint; 0 = unknown)
  const void* tc_values = nullptr;     // the weights of every k-step in MMA fragment order (see conv_tensor.cuh)
  int tc_kind = kTcNone;
  const float* tc_codebook = nullptr;  // kTcCodebook: the codebook the stream's codes index (with a zero level)
  int tc_codebook_stride = 0;          // as codebook_stride, for tc_codebook
  // G > 0: the 2:4 stream (sparsebench/sparse/pairs.py) for the sparse MMAs, each k-step (kPairK taps)
  // serving G consecutive groups (1, 2 or 4): G x 32 lanes' values, then G x 32 metadata words; tile_kptr
  // (one entry per G groups, plus one) and tile_cols are the stream's own, groups and tile_rows the tiles'.
  // tc_pairs = kTcSplit: tc_values is the split stream instead (sparsebench/sparse/split.py): for each of the
  // ceil(KH*KW*C / 32) k-steps of 32 taps in (kh, kw, ci) order, each group's two 2:4 halves (groups rounded up to 8).
  int tc_pairs = 0;
  // Planning.
  int variant = kAuto;
  int64_t nnz = 0;      // nonzeros stored (a planning hint; 0 = unknown)
  int64_t max_row = 0;  // nonzeros of the longest row (a planning hint; 0 = unknown)
  int plan = -1;        // one of plan_candidate(): its knobs and kernel instead of the rule's (-1: the rule)
};

// The launch plan the dispatcher picks (exposed for benchmarks and docs).
struct Plan {
  int variant = kRowSplit;
  int V = 0, TH = 0, TW = 0, TWv = 0, NI = 0, CC = 0, chunks = 0, rows_per_block = 0, threads = 0;
  int warps_per_row = 1;  // row-split: warps that share one output channel's nonzeros
  int64_t smem_bytes = 0;
  int64_t blocks = 0;
  bool flattened = false;  // a 1x1/stride-1/no-padding conv treated as one long image row
  bool linear = false;        // staged: a lane's V pixels sit 32 floats apart (one address register)
  // row-split: 16 contiguous pixels read as 4 vector loads (x 16-byte aligned); tensor: channels_last staged
  // two channels a thread, one 4-byte load a column (stride 1, one image a band, C even, x 4-byte aligned)
  bool vector_loads = false;
  // Tensor-core plans: m16 tiles per warp, the block's warps over pixels x K x groups, the tile's
  // images side by side (P) and stacked (NB), and its padded width.
  int MT = 0, warps_m = 0, warps_k = 0, warps_g = 0, P = 0, NB = 0, TWp = 0;
  int pairs = 0;  // G > 0: the sparse MMAs on the 2:4 stream of G groups a k-step (the call's tc_pairs must match)
  // pairs == kTcSplit: the implicit-GEMM kernel; a block computes rows_per_block channels x TW pixels, with the MMAs
  // wgmma names (GemmMma: 0 mma.sync, else Hopper's warpgroup MMAs).
  int wgmma = kMmaSync;
};

struct Tuning {
  int smem_budget = 100 * 1024;   // bytes of shared memory one staged block may use
  int rowsplit_max_pixels = 512;  // N*OH*OW up to which auto picks the row-split kernel
  int min_reuse = 24;             // FMAs each staged input value should feed (sets rows per block)
  int virtual_width = 1;          // let lanes sweep halo columns to avoid shared-memory bank conflicts
  int blocks_per_sm = 2;          // blocks per SM the staged kernel's grid aims for
  int rowsplit_warps_per_row = 0; // 1, 2 or 4 warps per output channel; 0: by rows and row length
  int stage_v = 0;                // pixels per lane of the staged kernel (1, 2 or 4); 0: the widest that fills the GPU
  int min_rows = 32;              // fewest output channels a staged block takes (32: 2 per warp)
  // Tensor-core kernels.
  int tc_mt = 4;                  // m16 pixel tiles per warp (1, 2, 4 or 8)
  int tc_pixels = 128;            // output pixels a block aims for (16..1024)
  int tc_warps_k = 1;             // warps that split one group's k-steps (1, 2, 4 or 8)
  int tc_smem_budget = 96 * 1024; // bytes of shared memory a tensor-core block may stage
  // Narrow images (< 32 columns) side by side in a row band where that pads fewer columns to a multiple
  // of 8; 0: one image a band, its columns padded, so the stride-1 staging reads each input window once.
  int tc_pack_images = 1;
  // G = 1, 2 or 4: the sparse MMAs (mma.sp) on the 2:4 stream of G groups a k-step; 0: dense MMAs on the
  // dense-MMA stream; kTcSplit: the implicit-GEMM kernel on the split stream (channels_last, C a multiple of 8).
  // The caller passes the stream the plan names (ConvArgs::tc_pairs).
  int tc_pairs = 0;
  int tc_gemm_tile = 0;  // the implicit-GEMM kernel's block: kGemmTiles[tc_gemm_tile]
  // 1: the implicit GEMM's wgmma tiles may run (Hopper). Off by default until the kernel has passed its GPU tests;
  // off (as on other GPUs), they plan as the mma.sync kernel's first tile, so the autotuner never picks them.
  int tc_wgmma = 0;
};

Tuning& tuning();
// The plans an autotuner may time for one call: candidate `id` (0 <= id < plan_candidate_count())
// is the process-wide knobs with a few of them changed, and a kernel (kStage, kRowSplit or kTensor).
// Several ids may give the same launch for a given shape. False for an id out of range.
int plan_candidate_count();
bool plan_candidate(int id, Tuning& knobs, int& variant);
// Why the tensor-core kernels cannot run this call ("" when they can).
std::string tensor_unsupported(const ConvArgs& a);
Plan make_plan(const ConvArgs& a);
// Launches on `stream` (a cudaStream_t); returns an error string, empty on success.
std::string launch_conv(const ConvArgs& a, void* stream);

int cuda_runtime_version_compiled();
int cuda_runtime_version();  // 0 when unknown
int cuda_driver_version();   // 0 when no driver is installed

}  // namespace sparsebench
