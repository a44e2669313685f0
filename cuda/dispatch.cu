// Picks the kernel and its blocking for one call, and launches it. Host code only; no
// allocation and no synchronisation, so every call can be captured in a CUDA graph.
#include <algorithm>
#include <string>

#include "kernels.cuh"

namespace sparsebench {

Tuning& tuning() {
  static Tuning t;
  return t;
}

// An attribute of the current GPU, cached per device; `fallback` (an H200's value) where none answers.
template <cudaDeviceAttr A>
static int device_attribute(int fallback) {
  static int cached[64];
  static bool queried[64] = {false};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return fallback;
  if (!queried[dev]) {
    int v = 0;
    cached[dev] = cudaDeviceGetAttribute(&v, A, dev) == cudaSuccess ? v : fallback;
    queried[dev] = true;
  }
  return cached[dev];
}

static int sm_count() { return device_attribute<cudaDevAttrMultiProcessorCount>(132); }
static int max_block_smem() { return device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(227 * 1024); }

static int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Whether the wgmma kernel can run: built (for sm_90a, whose code runs on compute capability 9.0 alone) and on such
// a GPU (planning without one assumes an H200).
static bool wgmma_available() {
#ifdef SPARSEBENCH_WGMMA
  return device_attribute<cudaDevAttrComputeCapabilityMajor>(9) == 9 &&
         device_attribute<cudaDevAttrComputeCapabilityMinor>(0) == 0;
#else
  return false;
#endif
}

// A 1x1, stride-1, unpadded conv is the same computation on one long image row; tiles then
// fill completely with no halo. Linear layers arrive as 1x1 images already.
static ConvArgs flatten(const ConvArgs& a, bool& flat) {
  ConvArgs g = a;
  flat = a.KH == 1 && a.KW == 1 && a.stride == 1 && a.pad == 0 && a.H * a.W > 1;
  if (flat) {
    g.W = a.H * a.W;
    g.H = 1;
    g.OW = a.OH * a.OW;
    g.OH = 1;
  }
  return g;
}

// Warps per row for the row-split kernel. Each lane's share of a row is a serial chain of
// dependent loads, so more warps per row help in two cases: the grid has too few warps to hide
// load latency (but not when rows are shorter than the lanes: the added warps get no nonzero),
// or the longest row is more than twice a resident warp's fair share of the work (trained layers:
// magnitude pruning leaves rows several times the mean) and long enough to give every lane of the
// doubled warps two nonzeros or more. Uniform long rows on a full grid gain
// nothing from splitting and pay the partial-sum reduction. The grid holds kRowSplitWarps / wpr
// rows per block in y (at most 65535 blocks), which caps wpr.
static int rowsplit_warps_per_row(const ConvArgs& a, const Tuning& tu, int64_t tiles) {
  const int64_t want_warps = 16ll * sm_count();
  const double resident = 32.0 * sm_count();  // 64 registers x 128 threads: 8 blocks of 4 warps per SM
  const double mean_row = a.nnz > 0 ? static_cast<double>(a.nnz) / a.CO : 1e9;  // unknown: assume long
  const double work = static_cast<double>(a.nnz) * tiles;  // row-tile steps of the whole layer
  auto longest_row_dominates = [&](int w) {
    const double warps = std::min(static_cast<double>(a.CO) * tiles * w, resident);
    return a.nnz > 0 && a.max_row > 64 * w && static_cast<double>(a.max_row) / w > 2.0 * work / warps;
  };
  int wpr = tu.rowsplit_warps_per_row;
  if (!wpr) {
    wpr = 1;
    while (wpr < kRowSplitWarps &&
           ((a.CO * tiles * wpr < want_warps && mean_row > 32.0 * wpr) || longest_row_dominates(wpr)))
      wpr *= 2;
  }
  while (wpr > 1 && cdiv(a.CO, kRowSplitWarps / wpr) > 65535) wpr /= 2;
  return wpr;
}

static Plan rowsplit_plan(const ConvArgs& a, const Tuning& tu) {
  Plan p;
  p.variant = kRowSplit;
  const int64_t M = static_cast<int64_t>(a.N) * a.OH * a.OW;
  const int64_t tiles = cdiv(M, kRowSplitPixels);
  p.warps_per_row = rowsplit_warps_per_row(a, tu, tiles);
  p.rows_per_block = kRowSplitWarps / p.warps_per_row;
  p.threads = kRowSplitWarps * 32;
  p.blocks = tiles * cdiv(a.CO, p.rows_per_block);
  p.vector_loads = contiguous_pixels(a);
  return p;
}

// Tile shape for 32*V lanes: whole output rows first, then several rows, then several images.
// TWv is the lanes per tile row: with stride 1 and rows that would wrap inside a warp, lanes
// also cover the KW-1 halo columns so a warp's shared loads hit 32 consecutive words (not for a
// halo as wide as the lanes: a kernel 32*V or more wide).
static void tile_shape(const ConvArgs& a, const Tuning& tu, int V, int& TW, int& TWv, int& TH, int& NI) {
  const int PT = 32 * V, halo = a.KW - 1;
  TW = std::min(a.OW, PT);
  TWv = TW;
  if (tu.virtual_width && a.stride == 1 && halo > 0 && halo < PT && TW % 32 != 0) {
    if (TW + halo > PT) TW = PT - halo;
    TWv = TW + halo;
  }
  TH = std::max(1, std::min(a.OH, PT / TWv));
  NI = std::max(1, std::min(a.N, PT / (TWv * TH)));
}

static bool stage_plan(const ConvArgs& a, const Tuning& tu, Plan& p, StageCfg& t) {
  const int KK = a.KH * a.KW;
  const int64_t want_blocks = static_cast<int64_t>(tu.blocks_per_sm) * sm_count();
  // Rows per block: enough that each staged input value feeds ~min_reuse FMAs (each row uses
  // it KK*density times), since every row group stages the input tile again.
  const double dense = static_cast<double>(a.CO) * a.C * KK;
  const double density = a.nnz > 0 ? std::max(1e-4, a.nnz / dense) : 0.1;
  const int64_t rg_min = std::min<int64_t>(
      a.CO, std::max<int64_t>(tu.min_rows, static_cast<int64_t>(tu.min_reuse / (KK * density) + 0.5)));
  const int64_t max_groups = std::max<int64_t>(1, a.CO / rg_min);
  int V = tu.stage_v ? tu.stage_v : 4, TW = 1, TWv = 1, TH = 1, NI = 1;
  int64_t tiles = 1;
  for (;; V /= 2) {
    tile_shape(a, tu, V, TW, TWv, TH, NI);
    tiles = cdiv(a.N, NI) * cdiv(a.OH, TH) * cdiv(a.OW, TW);
    if (tu.stage_v || V == 1 || tiles * max_groups >= want_blocks) break;
  }
  const int PT = 32 * V;
  int64_t groups = std::min(max_groups, std::max<int64_t>(1, cdiv(want_blocks, tiles)));
  // Parallelism beats reuse when there would be fewer blocks than SMs: then aim for the wanted
  // blocks per SM with fewer rows per block (down to min_rows), each warp's serial chain shorter.
  if (tiles * groups < sm_count())
    groups = std::max(groups, std::min(cdiv(want_blocks, tiles), std::max<int64_t>(1, a.CO / tu.min_rows)));
  int64_t RG = cdiv(a.CO, groups);
  const int RH = (TH - 1) * a.stride + a.KH, RW = (TW - 1) * a.stride + a.KW;
  const int64_t stage = static_cast<int64_t>(NI) * RH * RW;
  const int64_t ent = kStageWarps * 32 * 8;
  auto rows_bytes = [](int64_t rg) { return (rg * 3 + 3) / 4 * 16; };
  const int64_t budget = std::min<int64_t>(tu.smem_budget, max_block_smem());
  auto round4 = [](int64_t v) { return (v + 3) / 4 * 4; };
  // Linear lanes (see conv_stage.cu) past the tile read up to PT + KW - 1 floats past the staged
  // input: a pad keeps those reads off the other warps' buffers.
  const bool linear = a.stride == 1 && NI == 1 && TWv == RW;
  const int64_t pad = linear ? PT + a.KW : 0;

  int64_t CC = a.C, chunks = 1, acc = 0;
  if (round4(a.C * stage + pad) * 4 + ent + rows_bytes(RG) > budget) {
    // Several chunks: partial sums of RG rows x PT pixels wait in shared memory.
    RG = std::min<int64_t>(RG, std::max<int64_t>(tu.min_rows, budget / 2 / (PT * 4)));
    acc = RG * PT * 4;
    CC = (budget - acc - ent - rows_bytes(RG) - (pad + 3) * 4) / (stage * 4);  // + 3: rounding to 4 floats
    if (CC < 1) return false;
    chunks = cdiv(a.C, CC);
  }
  groups = cdiv(a.CO, RG);
  if (tiles > 0x7fffffff || groups > 65535) return false;
  const int64_t xs = round4(CC * stage + pad);

  t.V = V;
  t.TH = TH;
  t.TW = TW;
  t.NI = NI;
  t.RH = RH;
  t.RW = RW;
  t.CC = static_cast<int>(CC);
  t.chunks = static_cast<int>(chunks);
  t.RG = static_cast<int>(RG);
  t.TWv = TWv;
  t.tiles_w = static_cast<int>(cdiv(a.OW, TW));
  t.tiles_h = static_cast<int>(cdiv(a.OH, TH));
  t.stage = static_cast<int>(stage);
  t.xs = static_cast<int>(xs);
  t.linear = linear;
  t.div_RW = FastDiv(RW);
  t.div_RH = FastDiv(RH);
  t.div_NI = FastDiv(NI);
  t.div_KK = FastDiv(a.KH * a.KW);
  t.div_KW = FastDiv(a.KW);
  t.div_TWv = FastDiv(TWv);
  t.div_THTWv = FastDiv(TH * TWv);
  t.div_tiles_w = FastDiv(t.tiles_w);
  t.div_tiles_h = FastDiv(t.tiles_h);

  p.variant = kStage;
  p.V = V;
  p.TH = TH;
  p.TW = TW;
  p.TWv = TWv;
  p.NI = NI;
  p.CC = t.CC;
  p.chunks = t.chunks;
  p.rows_per_block = t.RG;
  p.threads = kStageWarps * 32;
  p.smem_bytes = xs * 4 + acc + ent + rows_bytes(RG);
  p.blocks = tiles * groups;
  p.linear = linear;
  return true;
}

// Why the implicit-GEMM kernel cannot run this call ("" when it can): it reads each pixel's channels as 16-byte
// units. (A linear layer's [N, C] input is both layouts: 1x1 images.)
static std::string gemm_unsupported(const ConvArgs& a) {
  if (a.layout != kNHWC && (a.H != 1 || a.W != 1 || a.OH != 1 || a.OW != 1))
    return "the implicit-GEMM kernel reads channels_last input";
  if (a.C % 8) return "the implicit-GEMM kernel needs a multiple of 8 input channels, got " + std::to_string(a.C);
  if (reinterpret_cast<uintptr_t>(a.x) % 16 || reinterpret_cast<uintptr_t>(a.tc_values) % 16)
    return "the implicit-GEMM kernel needs a 16-byte-aligned input and stream";
  // Its stream holds every weight place, 2.5 bytes each: layers past 2^25 places (80 MB) keep the direct kernel.
  if (static_cast<int64_t>(a.groups) * kTileRows * a.KH * a.KW * a.C > (1ll << 25))
    return "the implicit-GEMM kernel's stream would hold over 2^25 weight places";
  return "";
}

std::string tensor_unsupported(const ConvArgs& a) {
  if (a.act_dtype != kF16 && a.act_dtype != kBF16) return "activations are fp32 (the tensor-core kernels take fp16 or bf16)";
  if (!valid_tc_pairs(a.tc_pairs)) return std::string("tc_pairs: expected ") + kTcPairsAllowed;
  // Empty tensors (a layer without nonzeros) have no address: only the row and pointer tables must exist. The
  // split stream has no taps of its own, and at least one k-step.
  const bool split = a.tc_pairs == kTcSplit;
  if (!a.tile_rows || a.tc_kind == kTcNone || a.groups <= 0 ||
      (split ? !a.tc_values : !a.tile_kptr || (a.tile_steps != 0 && (!a.tile_cols || !a.tc_values))))
    return "the layer has no tensor-core tiles or weight stream";
  if (a.groups * kTileRows < a.CO) return "the tiles cover fewer output channels than the layer has";
  if (a.tc_kind == kTcLinear && (!a.scale || !a.zero_point)) return "linear codes need their scales and zero points";
  if (a.tc_kind == kTcCodebook && !a.tc_codebook) return "codebook codes need the codebook";
  if (a.tc_kind != kTcHalf && a.bits != 2 && a.bits != 4 && a.bits != 8) return "code streams take 2, 4 or 8 bits";
  return split ? gemm_unsupported(a) : "";
}

static int round8(int v) { return (v + 7) / 8 * 8; }
static int gcd(int a, int b) { return b ? gcd(b, a % b) : a; }

// Columns of a tensor-core tile: narrow images go side by side (P of them, the fewest that fill
// whole 8-column groups, if that wastes less than padding one image); wider ones are cut into
// column tiles of a multiple of 8, the width that pads the least.
static void tensor_columns(const ConvArgs& a, const Tuning& tu, int& P, int& TWp, int& OWv, int& tiles_w) {
  P = 1;
  if (tu.tc_pack_images && a.OW < 32 && a.N > 1) {
    int p = std::min(8 / gcd(a.OW, 8), a.N);
    while (p > 1 && p * a.OW > 64) --p;
    const double waste_side = 1.0 - static_cast<double>(p * a.OW) / round8(p * a.OW);
    const double waste_one = 1.0 - static_cast<double>(a.OW) / round8(a.OW);
    if (p > 1 && waste_side < waste_one) P = p;
  }
  if (P > 1) {
    OWv = P * a.OW;
    TWp = round8(OWv);
    tiles_w = 1;
    return;
  }
  TWp = 8;
  int64_t best = -1;
  for (int w = std::min(64, round8(a.OW)); w >= 8; w -= 8) {
    const int64_t waste = cdiv(a.OW, w) * w - a.OW;
    if (best < 0 || waste < best) {
      best = waste;
      TWp = w;
    }
  }
  OWv = TWp;
  tiles_w = static_cast<int>(cdiv(a.OW, TWp));
}

static bool tensor_plan(const ConvArgs& a, const Tuning& tu, Plan& p, TensorCfg& t) {
  if (!tensor_unsupported(a).empty()) return false;
  int P, TWp, OWv, tiles_w;
  tensor_columns(a, tu, P, TWp, OWv, tiles_w);
  const int NC = TWp / 8, PITCH = NC | 1;
  // Rows, then bands of images, up to the pixels a block aims for (padded columns counted), and no
  // more than its warps cover: 8 warps x MT m16 tiles (16 pixels, 2 groups of 8 columns).
  // A 2:4 k-step of G groups: each warp holds G x MT x 2 accumulator tiles, so MT x G stays at most kMaxPairTiles.
  const int G = tu.tc_pairs, NG = G > 0 ? G : 1;  // NG: groups a warp computes
  const int MT = std::min(tu.tc_mt == 1 || tu.tc_mt == 2 || tu.tc_mt == 8 ? tu.tc_mt : 4, kMaxPairTiles / NG);
  const int pixels = std::max(16, std::min(tu.tc_pixels, kTensorWarps * MT * 16));
  int TH = std::min(a.OH, std::max(1, pixels / TWp));
  const int tiles_h = static_cast<int>(cdiv(a.OH, TH));
  TH = static_cast<int>(cdiv(a.OH, tiles_h));
  const int bands = static_cast<int>(cdiv(a.N, P));
  int NB = std::max(1, std::min(bands, pixels / (TWp * TH)));
  const int tiles_n = static_cast<int>(cdiv(bands, NB));
  NB = static_cast<int>(cdiv(bands, tiles_n));
  const int RH = (TH - 1) * a.stride + a.KH;
  const int PG = NB * TH * NC;
  const int mtiles = (PG + 1) / 2;
  int warps_m = 1;
  while (warps_m < kTensorWarps && warps_m * MT < mtiles) warps_m *= 2;
  if (warps_m * MT < mtiles) return false;  // (cannot happen with the pixel cap above)
  int warps_k = 1;
  while (warps_k * 2 <= tu.tc_warps_k && warps_m * warps_k * 2 <= kTensorWarps) warps_k *= 2;
  const int warps_g = kTensorWarps / (warps_m * warps_k);
  // Shared memory: CC channels of KW copies and the zero unit, then each warp's ring of k-steps
  // (32 lanes' weights and 16 taps a step; with tc_pairs G groups' weights and metadata words and 32 taps);
  // the split-K sums reuse it at the end.
  const int64_t per_channel = (static_cast<int64_t>(a.KW) * NB * RH * PITCH) | 1;
  const int lane_bytes = a.tc_kind == kTcHalf ? 16 : a.bits;
  const int64_t ring_stage =
      32 * NG * (lane_bytes + (G ? 4 : 0)) + (G ? kPairK : kTileK) * (a.tile_col_bits / 8);
  const int64_t ring_bytes = static_cast<int64_t>(kTensorWarps) * tensor_stages(G) * ring_stage;
  const int64_t budget = std::min<int64_t>(tu.tc_smem_budget, max_block_smem()) - ring_bytes;
  int64_t CC = std::min<int64_t>(a.C, (budget / 16 - 1) / per_channel);
  // channels_last with stride 1 and one image a band stages 2 channels a thread (4-byte loads): whole
  // pairs a chunk.
  const bool channel_pairs = a.layout == kNHWC && a.stride == 1 && a.KW <= kWindowKW && P == 1 && a.C % 2 == 0 &&
                             CC >= 2 && reinterpret_cast<uintptr_t>(a.x) % 4 == 0;
  if (channel_pairs) CC -= CC % 2;
  if (CC < 1) return false;
  const int64_t ring = (CC * per_channel + 1) * 16;
  const int64_t reduce = warps_k > 1 ? static_cast<int64_t>(kTensorWarps) * 32 * MT * NG * 8 * 4 : 0;
  const int64_t smem = std::max(ring + ring_bytes, reduce);
  if (smem > max_block_smem()) return false;
  const int64_t tiles = static_cast<int64_t>(tiles_w) * tiles_h * tiles_n;
  const int64_t groups = cdiv(warp_group_count(a.groups, G), warps_g);
  if (tiles > 0x7fffffff || groups > 65535) return false;

  t.P = P;
  t.OWv = OWv;
  t.TWp = TWp;
  t.NC = NC;
  t.PITCH = PITCH;
  t.TH = TH;
  t.NB = NB;
  t.RH = RH;
  t.CSTRIDE = static_cast<int>(per_channel);
  t.CC = static_cast<int>(CC);
  t.chunks = static_cast<int>(cdiv(a.C, CC));
  t.PG = PG;
  t.warps_m = warps_m;
  t.warps_k = warps_k;
  t.warps_g = warps_g;
  t.tiles_w = tiles_w;
  t.tiles_h = tiles_h;
  t.tiles_n = tiles_n;
  t.zero_unit = static_cast<int>(CC * per_channel);
  t.ring = static_cast<int>(ring);
  t.ring_stage = static_cast<int>(ring_stage);
  t.div_NC = FastDiv(NC);
  t.div_RH = FastDiv(RH);
  t.div_NB = FastDiv(NB);
  t.div_OW = FastDiv(a.OW);
  t.div_TH = FastDiv(TH);
  t.div_CC = FastDiv(t.CC);
  t.channel_pairs = channel_pairs ? t.CC / 2 : 0;
  t.div_channel_pairs = FastDiv(std::max(1, t.channel_pairs));
  t.div_tiles_w = FastDiv(tiles_w);
  t.div_tiles_h = FastDiv(tiles_h);

  p = Plan{};
  p.variant = kTensor;
  p.MT = MT;
  p.warps_m = warps_m;
  p.warps_k = warps_k;
  p.warps_g = warps_g;
  p.P = P;
  p.NB = NB;
  p.TWp = TWp;
  p.pairs = G;
  p.vector_loads = channel_pairs;
  p.TH = TH;
  p.TW = OWv;
  p.NI = NB * P;
  p.CC = t.CC;
  p.chunks = t.chunks;
  p.rows_per_block = warps_g * NG * kTileRows;
  p.threads = kTensorWarps * 32;
  p.smem_bytes = smem;
  p.blocks = tiles * groups;
  return true;
}

// The implicit-GEMM kernel's blocking (kernels.cuh, GemmCfg): the block tile kGemmTiles[tc_gemm_tile].
static bool gemm_plan(const ConvArgs& a, const Tuning& tu, Plan& p, GemmCfg& t) {
  if (!tensor_unsupported(a).empty() || !gemm_unsupported(a).empty()) return false;
  if (tu.tc_gemm_tile < 0 || tu.tc_gemm_tile >= kGemmTileCount) return false;
  GemmTile tile = kGemmTiles[tu.tc_gemm_tile];
  // Where the wgmma kernel may not run (tc_wgmma off, or not a compute capability 9.0 GPU), its tiles are the
  // mma.sync kernel's first: the same stream, so the call's tc_pairs still holds.
  if (tile.mma != kMmaSync && !(tu.tc_wgmma && wgmma_available())) tile = kGemmTiles[0];
  const bool wgmma = tile.mma != kMmaSync;
  const int WM = tile.channels / 64, WN = tile.pixels / tile.warp_pixels, NT = tile.warp_pixels / 8;
  const int64_t M = static_cast<int64_t>(a.N) * a.OH * a.OW, K = static_cast<int64_t>(a.KH) * a.KW * a.C;
  const int64_t smem =
      wgmma ? wgmma_smem_bytes(tile.pixels) : static_cast<int64_t>(kGemmStages) * gemm_stage_bytes(WM, WN, NT);
  const int64_t blocks_m = cdiv(M, tile.pixels), blocks_g = cdiv(a.groups, 4 * WM);
  if (smem > max_block_smem() || blocks_g > 65535 || M + tile.pixels >= (1ll << 31) || K >= (1ll << 31)) return false;
  t.WM = WM;
  t.WN = WN;
  t.NT = NT;
  t.mma = tile.mma;
  t.M = static_cast<int>(M);
  t.K = static_cast<int>(K);
  t.steps = static_cast<int>(cdiv(K, kPairK));
  t.stream_groups = static_cast<int>(cdiv(a.groups, 8) * 8);
  t.div_OHOW = FastDiv(a.OH * a.OW);
  t.div_OW = FastDiv(a.OW);
  t.div_C = FastDiv(a.C);
  t.div_KW = FastDiv(a.KW);

  p = Plan{};
  p.variant = kTensor;
  p.pairs = kTcSplit;
  p.MT = tile.warp_pixels / 16;
  p.warps_m = WN;
  p.warps_k = 1;
  p.warps_g = WM;
  p.TW = tile.pixels;
  p.CC = a.C;
  p.chunks = 1;
  p.rows_per_block = 64 * WM;
  p.vector_loads = true;
  p.wgmma = tile.mma;
  p.threads = wgmma ? WM * 128 : WM * WN * 32;
  p.smem_bytes = smem;
  p.blocks = blocks_m * blocks_g;
  return true;
}

// The tensor-core plan the knobs name: the implicit-GEMM kernel's, or the direct kernel's. Where the implicit GEMM
// cannot run (gemm_unsupported), the direct kernel on the dense-MMA stream stands in for it, so that knobs naming it
// still run a whole network; ops.py's _gemm_capable passes that stream then.
static bool any_tensor_plan(const ConvArgs& a, const Tuning& tu, Plan& p, TensorCfg& tc, GemmCfg& gc) {
  if (tu.tc_pairs != kTcSplit) return tensor_plan(a, tu, p, tc);
  if (gemm_plan(a, tu, p, gc)) return true;
  Tuning dense = tu;
  dense.tc_pairs = 0;
  return gemm_unsupported(a).empty() ? false : tensor_plan(a, dense, p, tc);
}

static bool want_rowsplit(const ConvArgs& g, const Tuning& tu) {
  const int64_t M = static_cast<int64_t>(g.N) * g.OH * g.OW;
  return g.variant == kRowSplit || (g.variant == kAuto && M <= tu.rowsplit_max_pixels);
}

// Candidate plans: every combination of a few values of the staged kernel's knobs, then the
// row-split kernel at each warps-per-row. Values bracket the defaults (docs/kernels.md).
namespace {
constexpr int kCandV[] = {4, 2, 1};
constexpr int kCandWidth[] = {1, 0};
constexpr int kCandReuse[] = {12, 24, 48};
constexpr int kCandBudget[] = {100 * 1024, 200 * 1024};
constexpr int kCandBlocks[] = {1, 2, 4};
constexpr int kCandRows[] = {2 * kStageWarps, kStageWarps};
constexpr int kCandWarps[] = {1, 2, 4};
constexpr int kStageCandidates = 3 * 2 * 3 * 2 * 3 * 2;
constexpr int kRowSplitCandidates = 3;
constexpr int kCandMT[] = {4, 8, 2, 1};
constexpr int kCandPixels[] = {128, 64, 256};
constexpr int kCandWarpsK[] = {1, 2, 4, 8};
constexpr int kCandTcBudget[] = {96 * 1024, 192 * 1024};
constexpr int kCandPack[] = {1, 0};
constexpr int kCandPairs[] = {0, 1, 2, 4};
constexpr int kTensorCandidates = 4 * 3 * 4 * 2 * 2 * 4;
}  // namespace

// Ids: the staged kernel's, the row-split kernel's, the direct tensor-core kernel's, the implicit-GEMM kernel's.
int plan_candidate_count() { return kStageCandidates + kRowSplitCandidates + kTensorCandidates + kGemmTileCount; }

bool plan_candidate(int id, Tuning& knobs, int& variant) {
  if (id < 0 || id >= plan_candidate_count()) return false;
  knobs = tuning();
  if (id >= kStageCandidates + kRowSplitCandidates + kTensorCandidates) {
    variant = kTensor;
    knobs.tc_pairs = kTcSplit;
    knobs.tc_gemm_tile = id - (kStageCandidates + kRowSplitCandidates + kTensorCandidates);
    return true;
  }
  if (id >= kStageCandidates + kRowSplitCandidates) {
    id -= kStageCandidates + kRowSplitCandidates;
    variant = kTensor;
    knobs.tc_pairs = kCandPairs[id % 4];
    id /= 4;
    knobs.tc_smem_budget = kCandTcBudget[id % 2];
    id /= 2;
    knobs.tc_pack_images = kCandPack[id % 2];
    id /= 2;
    knobs.tc_warps_k = kCandWarpsK[id % 4];
    id /= 4;
    knobs.tc_pixels = kCandPixels[id % 3];
    knobs.tc_mt = kCandMT[id / 3];
    return true;
  }
  if (id >= kStageCandidates) {
    variant = kRowSplit;
    knobs.rowsplit_warps_per_row = kCandWarps[id - kStageCandidates];
    return true;
  }
  variant = kStage;
  knobs.min_rows = kCandRows[id % 2];
  id /= 2;
  knobs.blocks_per_sm = kCandBlocks[id % 3];
  id /= 3;
  knobs.smem_budget = kCandBudget[id % 2];
  id /= 2;
  knobs.min_reuse = kCandReuse[id % 3];
  id /= 3;
  knobs.virtual_width = kCandWidth[id % 2];
  knobs.stage_v = kCandV[id / 2];
  return true;
}

// The call's knobs and kernel choice: the process-wide ones, or those of its candidate plan.
static bool call_knobs(const ConvArgs& a, ConvArgs& g, Tuning& tu, bool& flat) {
  g = flatten(a, flat);
  tu = tuning();
  return a.plan < 0 || plan_candidate(a.plan, tu, g.variant);
}

// Tensor cores for the call: asked for, or (the rule) supported, outside the row-split regime.
// A candidate that asks for them where they cannot run falls back to the CUDA-core rule.
static bool want_tensor(const ConvArgs& a, const ConvArgs& g, const Tuning& tu) {
  if (g.variant == kTensor || a.layout == kNHWC) return true;  // the CUDA-core kernels read NCHW only
  return g.variant == kAuto && a.plan < 0 && tensor_unsupported(a).empty() &&
         static_cast<int64_t>(a.N) * a.OH * a.OW > tu.rowsplit_max_pixels;
}

Plan make_plan(const ConvArgs& a) {
  ConvArgs g;
  Tuning tu;
  bool flat = false;
  Plan p;
  StageCfg t;
  TensorCfg tc;
  GemmCfg gc;
  if (!call_knobs(a, g, tu, flat)) return p;
  if (want_tensor(a, g, tu) && any_tensor_plan(a, tu, p, tc, gc)) return p;  // planned on the unflattened shape
  if (a.layout == kNHWC) {  // nothing can run it (launch_conv says why)
    p.variant = -1;
    return p;
  }
  if (g.variant == kTensor) {
    g.variant = kAuto;
    tu = tuning();
  }
  if (want_rowsplit(g, tu) || !stage_plan(g, tu, p, t)) p = rowsplit_plan(g, tu);
  p.flattened = flat;
  return p;
}

std::string launch_conv(const ConvArgs& a, void* stream_handle) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_handle);
  if (a.N <= 0 || a.CO <= 0 || a.OH <= 0 || a.OW <= 0) return "";  // nothing to compute
  if (static_cast<int64_t>(a.N) * a.C * a.H * a.W >= (1ll << 31) ||
      static_cast<int64_t>(a.N) * a.CO * a.OH * a.OW >= (1ll << 31))
    return "tensors of 2**31 or more elements are not supported";
  ConvArgs g;
  Tuning tu;
  bool flat = false;
  if (!call_knobs(a, g, tu, flat)) return "plan: expected -1 or a candidate id below " + std::to_string(plan_candidate_count());
  Plan p;
  StageCfg t;
  TensorCfg tc;
  GemmCfg gc;
  std::string err;
  if (want_tensor(a, g, tu)) {
    if (any_tensor_plan(a, tu, p, tc, gc)) {
      if (a.tc_pairs != p.pairs) {
        const std::string kind = p.pairs == kTcSplit ? "split stream"
                                 : p.pairs        ? "2:4 stream of " + std::to_string(p.pairs) + " groups a k-step"
                                                  : "dense-MMA stream";
        return "tc_pairs: the plan runs on the " + kind + " (" + std::to_string(p.pairs) + "), the call passed " +
               std::to_string(a.tc_pairs);
      }
      err = p.pairs == kTcSplit ? launch_gemm(a, gc, stream) : launch_tensor(a, tc, p.MT, p.smem_bytes, stream);
      if (!err.empty()) return err;
      const cudaError_t e = cudaGetLastError();
      return e == cudaSuccess ? "" : std::string("kernel launch failed: ") + cudaGetErrorString(e);
    }
    if (a.variant == kTensor || a.layout == kNHWC) {
      const std::string why = tensor_unsupported(a);
      return "tensor-core kernels cannot run this call: " + (why.empty() ? "no blocking fits the shared memory" : why);
    }
    g.variant = kAuto;  // a tensor-core candidate that cannot run here: the CUDA-core rule
    tu = tuning();
  }
  if (!want_rowsplit(g, tu) && stage_plan(g, tu, p, t))
    err = launch_stage(g, t, p, stream);
  else
    err = launch_rowsplit(g, rowsplit_plan(g, tu).warps_per_row, stream);
  if (!err.empty()) return err;
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? "" : std::string("kernel launch failed: ") + cudaGetErrorString(e);
}

int cuda_runtime_version_compiled() { return CUDART_VERSION; }

int cuda_runtime_version() {
  int v = 0;
  return cudaRuntimeGetVersion(&v) == cudaSuccess ? v : 0;
}

int cuda_driver_version() {
  int v = 0;
  return cudaDriverGetVersion(&v) == cudaSuccess ? v : 0;
}

}  // namespace sparsebench
