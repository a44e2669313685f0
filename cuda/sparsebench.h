// Host-side interface of the sparsebench CUDA module: plain C++, no CUDA headers, so the
// pybind11 file compiles with the host compiler alone.
#pragma once
#include <cstdint>
#include <string>

namespace sparsebench {

enum ActDtype : int { kF32 = 0, kF16 = 1, kBF16 = 2 };
enum ValueKind : int { kValF32 = 0, kValF16 = 1, kValLinear = 2, kValCodebook = 3 };
enum Variant : int { kAuto = 0, kStage = 1, kRowSplit = 2 };

// One direct sparse convolution (a linear layer is the 1x1 case on a 1x1 image).
// x: [N, C, H, W] activations; out: [N, CO, OH, OW], same dtype; weights: CSR over CO.
struct ConvArgs {
  const void* x = nullptr;
  void* out = nullptr;
  int act_dtype = kF32;
  int N = 0, C = 0, H = 0, W = 0, CO = 0, KH = 1, KW = 1, stride = 1, pad = 0, OH = 0, OW = 0;
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
  bool vector_loads = false;  // row-split: 16 contiguous pixels read as 4 vector loads (if x is 16-byte aligned)
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
};

Tuning& tuning();
// The plans an autotuner may time for one call: candidate `id` (0 <= id < plan_candidate_count())
// is the process-wide knobs with a few of them changed, and a kernel (kStage or kRowSplit).
// Several ids may give the same launch for a given shape. False for an id out of range.
int plan_candidate_count();
bool plan_candidate(int id, Tuning& knobs, int& variant);
Plan make_plan(const ConvArgs& a);
// Launches on `stream` (a cudaStream_t); returns an error string, empty on success.
std::string launch_conv(const ConvArgs& a, void* stream);

int cuda_runtime_version_compiled();
int cuda_runtime_version();  // 0 when unknown
int cuda_driver_version();   // 0 when no driver is installed

}  // namespace sparsebench
