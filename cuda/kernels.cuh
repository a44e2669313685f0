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

// Row-split: a warp's 16 pixels are contiguous in memory and inside one image (a 1x1 conv on
// image rows, stride 1, no padding; one image with H*W a multiple of 4, or images of a multiple
// of 16 pixels), so they can be read as 4 vector loads where x is 16-byte aligned.
inline bool contiguous_pixels(const ConvArgs& a) {
  return a.KH == 1 && a.KW == 1 && a.stride == 1 && a.pad == 0 && a.H == 1 &&
         ((a.N == 1 && a.W % 4 == 0) || a.W % kRowSplitPixels == 0);
}

}  // namespace sparsebench
