// Implicit-GEMM tensor-core convolution on the split 2:4 stream: fp16/bf16 channels_last, fp32 accumulation.
//
// As a GEMM, out[channel][pixel] = sum over taps of w[channel][tap] * x[tap][pixel], with the taps in (kh, kw, ci)
// order, so 8 consecutive taps are 8 channels of one input pixel: 16 contiguous bytes of a channels_last
// input. Nothing is condensed: every k-step of 32 taps is computed for every group of 16 channels, with
// mma.sp.m16n8k32 (A: the weights, at most two nonzeros in each row's chunk of four; B: 32 taps x 8 pixels).
// An unstructured layer's chunk may hold more, so the stream (sparsebench/sparse/split.py) splits each group's
// k-step in two 2:4 halves, a row's first two nonzeros of a chunk and the rest; the second half is mostly empty
// (at 90% sparsity 38% of a group's k-steps have one; at 95% 6%), and a warp skips its MMAs where its flag says so.
// At 90% that is about 0.69x the MMAs of a dense layer, at 95% 0.53x.
//
// A block computes 64*WM channels (4 groups a warp) x 8*NT*WN output pixels (NT n8 tiles a warp). Each k-step,
// its threads copy the step's pixels (im2col on the fly: one 16-byte cp.async per pixel and 8 taps, zero-filled
// outside the image) and the block's groups' records of the stream into one of kGemmStages stages of shared
// memory, kGemmStages - 1 steps ahead of the MMAs. A stage's pixel rows are 64 bytes (32 taps); their four
// 16-byte units are XOR-swizzled by the row, so the 8 rows of an ldmatrix matrix fall in different banks.
#include "gemm_common.cuh"

namespace sparsebench {

namespace {

template <typename T, int WM, int WN, int NT>
__global__ void __launch_bounds__(WM * WN * 32) conv_gemm_kernel(const ConvArgs a, const GemmCfg t) {
  constexpr int kThreads = WM * WN * 32;
  constexpr int BN = 8 * NT * WN;         // pixels a block
  constexpr int kGroups = 4 * WM;         // groups a block
  constexpr int kBBytes = BN * 64;        // a stage's pixels: BN rows of 32 taps
  constexpr int kStageBytes = gemm_stage_bytes(WM, WN, NT);
  constexpr int kAUnits = kGroups * kSplitRecord / 16;
  extern __shared__ uint4 smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / WN, wn = warp % WN;
  const int pix0 = blockIdx.x * BN, g0 = blockIdx.y * kGroups;
  uint32_t sbase = static_cast<uint32_t>(__cvta_generic_to_shared(smem));

  const PixelGather<BN, kThreads> gather(a, t, tid, pix0);
  const char* __restrict__ records = static_cast<const char*>(a.tc_values) + static_cast<int64_t>(g0) * kSplitRecord;
  const int64_t step_bytes = static_cast<int64_t>(t.stream_groups) * kSplitRecord;

  auto load_step = [&](int s, int stage) {
    const uint32_t at = sbase + stage * kStageBytes;
    gather.template copy<T>(a, t, s, at);
    const char* rec = records + s * step_bytes;
#pragma unroll
    for (int u = tid; u < kAUnits; u += kThreads) cp_async16(at + kBBytes + u * 16, rec + u * 16);
  };

#pragma unroll
  for (int s = 0; s < kGemmStages - 1; ++s) {
    if (s < t.steps) load_step(s, s);
    cp_async_commit();
  }

  float acc[4][NT][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int v = 0; v < 4; ++v) acc[i][j][v] = 0.f;

  // ldmatrix: lane 8m + i addresses row i of matrix m, taps 8m .. 8m + 7 of pixel row 8j + i of the warp's tile j.
  const uint32_t b_lane = wn * NT * 512 + (lane & 7) * 64 + (((lane >> 3) ^ ((lane >> 1) & 3)) << 4);
  const int a_warp = kBBytes + wm * 4 * kSplitRecord;
  for (int s = 0, stage = 0; s < t.steps; ++s) {
    cp_async_wait<kGemmStages - 2>();  // step s has landed (this thread's copies) ...
    __syncthreads();                   // ... every thread's, and every warp is done with step s - 1's stage
    {
      const int f = s + kGemmStages - 1;
      if (f < t.steps) load_step(f, stage == 0 ? kGemmStages - 1 : stage - 1);
      cp_async_commit();
    }
    const uint32_t at = sbase + stage * kStageBytes;
    const char* rec = reinterpret_cast<const char*>(smem) + stage * kStageBytes + a_warp;
    uint32_t b[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) ldmatrix_x4(b[j], at + b_lane + j * 512);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const char* r = rec + i * kSplitRecord;
      const uint4 v1 = *reinterpret_cast<const uint4*>(r + lane * 16);
      const uint2 meta = *reinterpret_cast<const uint2*>(r + kRecordMeta + lane * 8);
      const int second = *reinterpret_cast<const int*>(r + kRecordFlag);
      const uint32_t w1[4] = {v1.x, v1.y, v1.z, v1.w};
#pragma unroll
      for (int j = 0; j < NT; ++j) Mma<T>::run_sp(acc[i][j], w1, b[j], meta.x);
      if (second) {  // the same for the whole warp
        const uint4 v2 = *reinterpret_cast<const uint4*>(r + kRecordA2 + lane * 16);
        const uint32_t w2[4] = {v2.x, v2.y, v2.z, v2.w};
#pragma unroll
        for (int j = 0; j < NT; ++j) Mma<T>::run_sp(acc[i][j], w2, b[j], meta.y);
      }
    }
    stage = stage == kGemmStages - 1 ? 0 : stage + 1;
  }

  // Epilogue: group i's accumulators, pixel tiles from the warp's first pixel on.
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int group = g0 + wm * 4 + i;
    if (group >= a.groups) break;
    store_group<T, NT>(a, t.M, group, pix0 + wn * NT * 8, acc[i]);
  }
}

template <typename T, int WM, int WN, int NT>
std::string launch_tiles(const ConvArgs& a, const GemmCfg& t, cudaStream_t stream) {
  auto kernel = conv_gemm_kernel<T, WM, WN, NT>;
  const int smem = kGemmStages * gemm_stage_bytes(WM, WN, NT);
  const std::string err = allow_dynamic_smem(kernel, smem);
  if (!err.empty()) return err;
  const dim3 grid(static_cast<unsigned>((t.M + 8 * NT * WN - 1) / (8 * NT * WN)),
                  static_cast<unsigned>((a.groups + 4 * WM - 1) / (4 * WM)));
  kernel<<<grid, WM * WN * 32, smem, stream>>>(a, t);
  return "";
}

template <typename T>
std::string launch_dtype(const ConvArgs& a, const GemmCfg& t, cudaStream_t s) {
  // kGemmTiles, in order.
  if (t.WM == 2 && t.WN == 4 && t.NT == 4) return launch_tiles<T, 2, 4, 4>(a, t, s);
  if (t.WM == 2 && t.WN == 2 && t.NT == 4) return launch_tiles<T, 2, 2, 4>(a, t, s);
  if (t.WM == 1 && t.WN == 4 && t.NT == 4) return launch_tiles<T, 1, 4, 4>(a, t, s);
  if (t.WM == 1 && t.WN == 2 && t.NT == 4) return launch_tiles<T, 1, 2, 4>(a, t, s);
  if (t.WM == 2 && t.WN == 2 && t.NT == 8) return launch_tiles<T, 2, 2, 8>(a, t, s);
  if (t.WM == 1 && t.WN == 2 && t.NT == 8) return launch_tiles<T, 1, 2, 8>(a, t, s);
  if (t.WM == 2 && t.WN == 4 && t.NT == 8) return launch_tiles<T, 2, 4, 8>(a, t, s);
  return "implicit-GEMM kernel: no instance for WM " + std::to_string(t.WM) + ", WN " + std::to_string(t.WN) +
         ", NT " + std::to_string(t.NT);
}

}  // namespace

std::string launch_gemm(const ConvArgs& a, const GemmCfg& t, cudaStream_t stream) {
#ifdef SPARSEBENCH_WGMMA
  if (t.mma != kMmaSync) return launch_wgmma(a, t, stream);
#else
  if (t.mma != kMmaSync) return "implicit-GEMM kernel: built without the wgmma kernel (it needs sm_90 in the CUDA archs)";
#endif
  switch (a.act_dtype) {
    case kF16: return launch_dtype<__half>(a, t, stream);
    case kBF16: return launch_dtype<__nv_bfloat16>(a, t, stream);
    default: return "implicit-GEMM kernel: activations must be fp16 or bf16";
  }
}

}  // namespace sparsebench
