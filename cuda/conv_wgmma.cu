// Implicit-GEMM convolution on Hopper's warpgroup MMA (sm_90a): the split 2:4 stream of conv_gemm.cu, computed with
// wgmma.mma_async.sp instead of mma.sync (its second halves with either).
//
// The GEMM is conv_gemm.cu's: out[channel][pixel] = sum over taps (kh, kw, ci) of w[channel][tap] * x[tap][pixel],
// every tap of every channel, a k-step being 32 taps. A warpgroup computes 64 channels (its warps' four groups of
// the stream) x N pixels; a block has WG warpgroups over channels, sharing the pixels. Each k-step:
// - the warpgroup issues N / 64 m64n64k32 sparse wgmmas on the first 2:4 half, and as many on the second where any
//   of its four groups has one there (the flag of four, kRecordFlag4: a wgmma runs for all 64 channels or none).
//   At 90% sparsity that is most k-steps (each group has one in 38% of them), at 95% about a fifth. Or
//   (kWgmmaWarpSecond) each warp runs its own group's second half by mma.sync once the wgmmas retire, only where
//   that group has one;
// - while they run, all threads gather the pixels of a step kWgmmaStages - 1 ahead (im2col by cp.async,
//   PixelGather) into the stage the previous step used, and each warp loads its group's weights two steps ahead
//   straight from the stream into registers (the m16n8k32 A fragment is also wgmma's, per warp), so weights never
//   pass through shared memory;
// - then it waits for its wgmmas: the A registers they read are theirs until they retire.
// B is read by the tensor cores from shared memory through a descriptor: PixelGather's rows are wgmma's 64-byte
// swizzle mode, stages 1024-byte aligned.
#include "gemm_common.cuh"
#include "wgmma.cuh"

namespace sparsebench {

namespace {

// The flags are lanes' first metadata words (kRecordFlag: lane 2, kRecordFlag4: lane 3): a shuffle reads them.
static_assert(kRecordFlag == kRecordMeta + 2 * 8 && kRecordFlag4 == kRecordMeta + 3 * 8, "flags: lanes 2 and 3");

// A warp's weights of one k-step: both halves' A fragments and the lane's metadata words.
struct SplitStep {
  uint4 a1, a2;
  uint2 meta;
};

__device__ __forceinline__ SplitStep load_split_step(const char* rec, int lane) {
  SplitStep w;
  w.a1 = __ldg(reinterpret_cast<const uint4*>(rec) + lane);
  w.a2 = __ldg(reinterpret_cast<const uint4*>(rec + kRecordA2) + lane);
  w.meta = __ldg(reinterpret_cast<const uint2*>(rec + kRecordMeta) + lane);
  return w;
}

template <typename T, int NC>
__device__ __forceinline__ void wgmma_half(float (&acc)[8 * NC][4], const uint4& v, uint64_t desc, uint32_t meta) {
  const uint32_t a[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int c = 0; c < NC; ++c)  // 64 pixels (4096 bytes of B) each; the descriptor counts 16-byte units
    Wgmma<T>::sp_n64(reinterpret_cast<float(&)[8][4]>(acc[8 * c]), a, desc + c * (4096 >> 4), meta);
}

// The warp's own second half of a k-step by mma.sync (kWgmmaWarpSecond), on the stage's pixels through ldmatrix
// (PixelGather's rows: lane 8m + i addresses row i of matrix m, taps 8m .. 8m + 7 of pixel 8j + i), into the
// accumulators the wgmmas left (the same m16n8 layout a warp).
template <typename T, int NT>
__device__ __forceinline__ void mma_sync_half(float (&acc)[NT][4], const uint4& v, uint32_t stage, uint32_t meta) {
  const int lane = threadIdx.x & 31;
  const uint32_t a[4] = {v.x, v.y, v.z, v.w};
  const uint32_t b_lane = stage + (lane & 7) * 64 + (((lane >> 3) ^ ((lane >> 1) & 3)) << 4);
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    uint32_t b[4];
    ldmatrix_x4(b, b_lane + j * 512);
    Mma<T>::run_sp(acc[j], a, b, meta);
  }
}

template <typename T, int WG, int N, GemmMma kMma>
__global__ void __launch_bounds__(WG * 128) conv_wgmma_kernel(const ConvArgs a, const GemmCfg t) {
  constexpr int kThreads = WG * 128, NT = N / 8, NC = N / 64;
  constexpr int kStageBytes = N * 64;
  constexpr int kAhead = kWgmmaStages - 1;  // steps of pixels in flight
  extern __shared__ uint4 smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int pix0 = blockIdx.x * N, group = blockIdx.y * 4 * WG + warp;
  const uint32_t sbase = (static_cast<uint32_t>(__cvta_generic_to_shared(smem)) + 1023) & ~1023u;

  const PixelGather<N, kThreads> gather(a, t, tid, pix0);
  const char* __restrict__ rec = static_cast<const char*>(a.tc_values) + static_cast<int64_t>(group) * kSplitRecord;
  const int64_t step_bytes = static_cast<int64_t>(t.stream_groups) * kSplitRecord;

#pragma unroll
  for (int s = 0; s < kAhead; ++s) {
    if (s < t.steps) gather.template copy<T>(a, t, s, sbase + s * kStageBytes);
    cp_async_commit();
  }
  // Weights two steps ahead in registers: a load from L2 has a step's wgmmas and more to land.
  SplitStep w = load_split_step(rec, lane);
  SplitStep w_next = t.steps > 1 ? load_split_step(rec + step_bytes, lane) : w;

  float acc[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int v = 0; v < 4; ++v) acc[j][v] = 0.f;

  for (int s = 0, stage = 0, fill = kAhead; s < t.steps; ++s) {
    cp_async_wait<kAhead - 1>();  // step s has landed (this thread's copies) ...
    fence_proxy_async();          // ... is visible to the tensor cores ...
    __syncthreads();              // ... for every thread; and every warpgroup has retired step s - 1's wgmmas

    const uint32_t at = sbase + stage * kStageBytes;
    const uint64_t desc = wgmma_desc_k64(at);
    // Lane 3's first word: the flag of four (kWgmma); lane 2's, the warp's own (kWgmmaWarpSecond).
    const bool second = __shfl_sync(0xffffffffu, w.meta.x, kMma == kWgmma ? 3 : 2) != 0;
    wgmma_fence_operands(acc);  // the previous step's mma.sync (kWgmmaWarpSecond) stays before the fence
    // One branch a group of wgmmas: a conditional wgmma within a group makes ptxas fence it apart.
    if (kMma == kWgmma && second) {
      wgmma_fence();
      wgmma_half<T, NC>(acc, w.a1, desc, w.meta.x);
      wgmma_half<T, NC>(acc, w.a2, desc, w.meta.y);
      wgmma_commit();
    } else {
      wgmma_fence();
      wgmma_half<T, NC>(acc, w.a1, desc, w.meta.x);
      wgmma_commit();
    }

    // While the tensor cores run: the pixels of a later step into the stage step s - 1 used, and the weights of
    // step s + 2 into registers of their own (those of step s are the wgmmas' until they retire).
    if (s + kAhead < t.steps) gather.template copy<T>(a, t, s + kAhead, sbase + fill * kStageBytes);
    cp_async_commit();
    const SplitStep later = s + 2 < t.steps ? load_split_step(rec + (s + 2) * step_bytes, lane) : w_next;
    wgmma_wait<0>();
    if (kMma == kWgmmaWarpSecond && second) {  // the stage stays until every warp passes the next barrier
      wgmma_fence_operands(acc);
      mma_sync_half<T, NT>(acc, w.a2, at, w.meta.y);
    }
    w = w_next;
    w_next = later;
    stage = stage == kWgmmaStages - 1 ? 0 : stage + 1;
    fill = fill == kWgmmaStages - 1 ? 0 : fill + 1;
  }
  wgmma_fence_operands(acc);
  if (group < a.groups) store_group<T, NT>(a, t.M, group, pix0, acc);
}

template <typename T, int WG, int N>
std::string launch_tile(const ConvArgs& a, const GemmCfg& t, cudaStream_t stream) {
  auto kernel = t.mma == kWgmma ? conv_wgmma_kernel<T, WG, N, kWgmma> : conv_wgmma_kernel<T, WG, N, kWgmmaWarpSecond>;
  const int smem = wgmma_smem_bytes(N);
  const std::string err = allow_dynamic_smem(kernel, smem);
  if (!err.empty()) return err;
  const dim3 grid(static_cast<unsigned>((t.M + N - 1) / N), static_cast<unsigned>((a.groups + 4 * WG - 1) / (4 * WG)));
  kernel<<<grid, WG * 128, smem, stream>>>(a, t);
  return "";
}

template <typename T>
std::string launch_dtype(const ConvArgs& a, const GemmCfg& t, cudaStream_t s) {
  const int N = 8 * t.NT;
  if (t.WM == 1 && N == 128) return launch_tile<T, 1, 128>(a, t, s);
  if (t.WM == 2 && N == 128) return launch_tile<T, 2, 128>(a, t, s);
  if (t.WM == 1 && N == 256) return launch_tile<T, 1, 256>(a, t, s);
  if (t.WM == 2 && N == 256) return launch_tile<T, 2, 256>(a, t, s);
  return "wgmma kernel: no instance for " + std::to_string(t.WM) + " warpgroups x " + std::to_string(N) + " pixels";
}

}  // namespace

std::string launch_wgmma(const ConvArgs& a, const GemmCfg& t, cudaStream_t stream) {
  switch (a.act_dtype) {
    case kF16: return launch_dtype<__half>(a, t, stream);
    case kBF16: return launch_dtype<__nv_bfloat16>(a, t, stream);
    default: return "wgmma kernel: activations must be fp16 or bf16";
  }
}

}  // namespace sparsebench
