// Launch-time description of the tiled kernel's blocking (filled by the dispatcher).
#pragma once
#include <cuda_runtime.h>

#include <string>

#include "common.cuh"

namespace sparsebench {

struct TileCfg {
  int TH, TW, G, RH, RW, CC, cap, n_bands, total_slots;
  FastDiv div_bands, div_KK, div_KW, div_RW, div_RH, div_G;
};

std::string launch_tile(const ConvArgs& a, const TileCfg& t, const Plan& p, cudaStream_t stream);
std::string launch_rowsplit(const ConvArgs& a, cudaStream_t stream);

// Row-split kernel blocking: warps per block and output pixels per warp.
constexpr int kRowSplitWarps = 4;
constexpr int kRowSplitPixels = 16;

}  // namespace sparsebench
