// Launch-time descriptions of the kernels' blocking (filled by the dispatcher) and launchers.
#pragma once
#include <cuda_runtime.h>

#include <string>

#include "common.cuh"

namespace sparsebench {

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
std::string launch_rowsplit(const ConvArgs& a, int warps_per_row, cudaStream_t stream);

// Row-split kernel blocking: warps per block (1, 2 or 4 of them per row) and output pixels per warp.
constexpr int kRowSplitWarps = 4;
constexpr int kRowSplitPixels = 16;

}  // namespace sparsebench
