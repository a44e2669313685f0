// Picks the kernel and its blocking for one call, and launches it. Host code only; no
// allocation and no synchronisation, so every call can be captured in a CUDA graph.
#include <algorithm>

#include "tile.cuh"

namespace sparsebench {

Tuning& tuning() {
  static Tuning t;
  return t;
}

static int sm_count() {
  static int cached[64] = {0};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 132;
  if (!cached[dev]) {
    int v = 0;
    cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev);
    cached[dev] = v > 0 ? v : 132;
  }
  return cached[dev];
}

static Plan rowsplit_plan(const ConvArgs& a) {
  Plan p;
  p.variant = kRowSplit;
  p.rows_per_block = kRowSplitWarps;
  p.threads = kRowSplitWarps * 32;
  const int64_t M = static_cast<int64_t>(a.N) * a.OH * a.OW;
  p.blocks = ((M + kRowSplitPixels - 1) / kRowSplitPixels) * ((a.CO + kRowSplitWarps - 1) / kRowSplitWarps);
  return p;
}

static TileCfg tile_cfg(const ConvArgs& a, int G, int TH, int TW, int CC) {
  TileCfg t{};
  t.TH = TH;
  t.TW = TW;
  t.G = G;
  t.RH = (TH - 1) * a.stride + a.KH;
  t.RW = (TW - 1) * a.stride + a.KW;
  t.CC = CC;
  t.cap = CC * a.KH * a.KW;
  t.n_bands = (a.OH + TH - 1) / TH;
  t.total_slots = a.N * t.n_bands;
  t.div_bands = FastDiv(t.n_bands);
  t.div_KK = FastDiv(a.KH * a.KW);
  t.div_KW = FastDiv(a.KW);
  t.div_RW = FastDiv(t.RW);
  t.div_RH = FastDiv(t.RH);
  t.div_G = FastDiv(G);
  return t;
}

// Fills `plan` and `cfg` for the tiled kernel; false when it cannot fit shared memory.
static bool tile_plan(const ConvArgs& a, Plan& plan, TileCfg& cfg) {
  const Tuning& tu = tuning();
  int TW = a.OW;
  if (a.OW > 16) {
    TW = 16;
    for (int d = 16; d >= 8; --d)
      if (a.OW % d == 0) { TW = d; break; }
  }
  const int TH = std::max(1, std::min(a.OH, 32 / TW));
  const int positions = TH * TW;
  const int n_bands = (a.OH + TH - 1) / TH;
  const int64_t slots = static_cast<int64_t>(a.N) * n_bands;
  int G = std::max(1, tu.tile_threads / positions);
  G = static_cast<int>(std::min<int64_t>(G, (slots + 3) / 4));
  const int RH = (TH - 1) * a.stride + a.KH, RW = (TW - 1) * a.stride + a.KW;
  const int64_t slot_blocks = (slots + 4 * G - 1) / (4 * G);
  const int64_t ow_tiles = (a.OW + TW - 1) / TW;
  const int64_t blocks16 = slot_blocks * ow_tiles * ((a.CO + 15) / 16);
  const int R = blocks16 >= 2 * sm_count() ? 16 : 4;
  const int KK = a.KH * a.KW;
  const int64_t per_channel = static_cast<int64_t>(G) * RH * RW * 16 + static_cast<int64_t>(R) * KK * 8;
  const int64_t fixed = (4 * R + 8 * G) * 4;
  const int64_t CC = std::min<int64_t>(a.C, (tu.smem_budget - fixed) / per_channel);
  if (CC < 1 || slot_blocks > 0x7fffffff || ow_tiles > 65535 || (a.CO + R - 1) / R > 65535) return false;
  cfg = tile_cfg(a, G, TH, TW, static_cast<int>(CC));
  plan.variant = kTile;
  plan.rows_per_block = R;
  plan.TH = TH;
  plan.TW = TW;
  plan.G = G;
  plan.CC = static_cast<int>(CC);
  plan.threads = (G * positions + 31) / 32 * 32;
  plan.smem_bytes = CC * per_channel + fixed;
  plan.blocks = slot_blocks * ow_tiles * ((a.CO + R - 1) / R);
  return true;
}

Plan make_plan(const ConvArgs& a) {
  const int64_t M = static_cast<int64_t>(a.N) * a.OH * a.OW;
  const bool want_rows = a.variant == kRowSplit || (a.variant == kAuto && M <= tuning().rowsplit_max_pixels);
  Plan p;
  TileCfg cfg;
  if (!want_rows && tile_plan(a, p, cfg)) return p;
  return rowsplit_plan(a);
}

std::string launch_conv(const ConvArgs& a, void* stream_handle) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_handle);
  if (a.N <= 0 || a.CO <= 0 || a.OH <= 0 || a.OW <= 0) return "";  // nothing to compute
  if (static_cast<int64_t>(a.N) * a.C * a.H * a.W >= (1ll << 31) ||
      static_cast<int64_t>(a.N) * a.CO * a.OH * a.OW >= (1ll << 31))
    return "tensors of 2**31 or more elements are not supported";
  const int64_t M = static_cast<int64_t>(a.N) * a.OH * a.OW;
  const bool want_rows = a.variant == kRowSplit || (a.variant == kAuto && M <= tuning().rowsplit_max_pixels);
  Plan p;
  TileCfg cfg;
  std::string err;
  if (!want_rows && tile_plan(a, p, cfg)) {
    err = launch_tile(a, cfg, p, stream);
  } else {
    err = launch_rowsplit(a, stream);
  }
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
