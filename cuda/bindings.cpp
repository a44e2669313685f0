// The one pybind11 file: a typed ConvArgs struct of raw device pointers and sizes, nothing
// allocated, no libtorch. Python fills a ConvArgs (pointers from tensor.data_ptr()) and passes it
// with torch.cuda.current_stream().cuda_stream.
#include <pybind11/pybind11.h>

#include <stdexcept>

#include "sparsebench.h"

namespace py = pybind11;
using namespace sparsebench;

#ifndef SPARSEBENCH_SRC_SHA256
#define SPARSEBENCH_SRC_SHA256 "unknown"
#endif
#ifndef SPARSEBENCH_BUILT_AT
#define SPARSEBENCH_BUILT_AT "unknown"
#endif
#ifndef SPARSEBENCH_CUDA_ARCHS
#define SPARSEBENCH_CUDA_ARCHS "unknown"
#endif

namespace {

const char* variant_name(int v) {
  switch (v) {
    case kStage: return "stage";
    case kRowSplit: return "rowsplit";
    case kTensor: return "tensor";
    default: return "none";
  }
}

// The checks every entry point makes on a ConvArgs: one std::invalid_argument naming the field.
void check_args(const ConvArgs& a) {
  if (a.act_dtype < kF32 || a.act_dtype > kBF16) throw std::invalid_argument("act_dtype: expected 0 (f32), 1 (f16), 2 (bf16)");
  if (a.layout != kNCHW && a.layout != kNHWC) throw std::invalid_argument("layout: expected 0 (NCHW) or 1 (NHWC)");
  if (a.value_kind < kValF32 || a.value_kind > kValCodebook) throw std::invalid_argument("value_kind: expected 0..3");
  if (a.col_bits != 16 && a.col_bits != 32) throw std::invalid_argument("col_bits: expected 16 or 32");
  if (a.tile_col_bits != 16 && a.tile_col_bits != 32) throw std::invalid_argument("tile_col_bits: expected 16 or 32");
  if (a.value_kind >= kValLinear && a.bits != 2 && a.bits != 4 && a.bits != 8)
    throw std::invalid_argument("bits: expected 2, 4 or 8");
  if (a.variant < kAuto || a.variant > kTensor)
    throw std::invalid_argument("variant: expected 0 (auto), 1 (stage), 2 (rowsplit) or 3 (tensor)");
  if (a.tc_kind < kTcNone || a.tc_kind > kTcCodebook)
    throw std::invalid_argument("tc_kind: expected -1 (none), 0 (values), 1 (linear codes), 2 (codebook codes)");
  if (a.codebook_stride < 0 ||
      (a.codebook_stride > 0 && (a.value_kind != kValCodebook || a.codebook_stride > (1 << a.bits))))
    throw std::invalid_argument("codebook_stride: expected 0 (one codebook for the layer) or 1..2**bits (the levels of each row's codebook)");
  if (a.tc_codebook_stride < 0) throw std::invalid_argument("tc_codebook_stride: expected >= 0");
  if (!valid_tc_pairs(a.tc_pairs)) throw std::invalid_argument(std::string("tc_pairs: expected ") + kTcPairsAllowed);
  if (a.stride < 1 || a.pad < 0 || a.KH < 1 || a.KW < 1) throw std::invalid_argument("stride >= 1, pad >= 0, kernel >= 1 required");
  if (a.N < 0 || a.C < 0 || a.H < 0 || a.W < 0 || a.CO < 0 || a.OH < 0 || a.OW < 0 || a.groups < 0)
    throw std::invalid_argument("N, C, H, W, CO, OH, OW and groups must be >= 0");
  if (a.plan < -1 || a.plan >= plan_candidate_count())
    throw std::invalid_argument("plan: expected -1 (the dispatcher's rule) or a candidate id 0.." +
                                std::to_string(plan_candidate_count() - 1));
  if (a.plan >= 0 && a.variant != kAuto)
    throw std::invalid_argument("plan: a candidate plan picks its own kernel; pass variant 0 (auto) with it");
}

py::dict knobs_dict(const Tuning& t) {
  py::dict d;
  d["smem_budget"] = t.smem_budget;
  d["rowsplit_max_pixels"] = t.rowsplit_max_pixels;
  d["blocks_per_sm"] = t.blocks_per_sm;
  d["min_reuse"] = t.min_reuse;
  d["virtual_width"] = t.virtual_width;
  d["rowsplit_warps_per_row"] = t.rowsplit_warps_per_row;
  d["stage_v"] = t.stage_v;
  d["min_rows"] = t.min_rows;
  d["tc_mt"] = t.tc_mt;
  d["tc_pixels"] = t.tc_pixels;
  d["tc_warps_k"] = t.tc_warps_k;
  d["tc_smem_budget"] = t.tc_smem_budget;
  d["tc_pack_images"] = t.tc_pack_images;
  d["tc_pairs"] = t.tc_pairs;
  d["tc_gemm_tile"] = t.tc_gemm_tile;
  d["tc_wgmma"] = t.tc_wgmma;
  return d;
}

py::dict plan_dict(const Plan& p) {
  py::dict d;
  d["variant"] = variant_name(p.variant);
  d["V"] = p.V;
  d["TH"] = p.TH;
  d["TW"] = p.TW;
  d["TWv"] = p.TWv;
  d["NI"] = p.NI;
  d["CC"] = p.CC;
  d["chunks"] = p.chunks;
  d["rows_per_block"] = p.rows_per_block;
  d["warps_per_row"] = p.warps_per_row;
  d["threads"] = p.threads;
  d["smem_bytes"] = p.smem_bytes;
  d["blocks"] = p.blocks;
  d["flattened"] = p.flattened;
  d["linear"] = p.linear;
  d["vector_loads"] = p.vector_loads;
  d["MT"] = p.MT;
  d["warps_m"] = p.warps_m;
  d["warps_k"] = p.warps_k;
  d["warps_g"] = p.warps_g;
  d["P"] = p.P;
  d["pairs"] = p.pairs;
  d["wgmma"] = p.wgmma;
  d["NB"] = p.NB;
  d["TWp"] = p.TWp;
  return d;
}

template <typename P>
void bind_pointer(py::class_<ConvArgs>& cls, const char* name, P ConvArgs::*field) {
  cls.def_property(
      name, [field](const ConvArgs& a) { return reinterpret_cast<uintptr_t>(a.*field); },
      [field](ConvArgs& a, uintptr_t v) { a.*field = reinterpret_cast<P>(v); });
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "sparsebench CUDA kernels: direct sparse conv2d / linear over the packed format";

  py::class_<ConvArgs> args(m, "ConvArgs",
                            "One direct sparse convolution: geometry, device pointers (ints, 0 for absent) and "
                            "planning hints; see cuda/sparsebench.h for each field.");
  args.def(py::init<>());
  bind_pointer(args, "x", &ConvArgs::x);
  bind_pointer(args, "out", &ConvArgs::out);
  bind_pointer(args, "rowptr", &ConvArgs::rowptr);
  bind_pointer(args, "colidx", &ConvArgs::colidx);
  bind_pointer(args, "row_order", &ConvArgs::row_order);
  bind_pointer(args, "values", &ConvArgs::values);
  bind_pointer(args, "scale", &ConvArgs::scale);
  bind_pointer(args, "zero_point", &ConvArgs::zero_point);
  bind_pointer(args, "codebook", &ConvArgs::codebook);
  bind_pointer(args, "bias", &ConvArgs::bias);
  bind_pointer(args, "tile_rows", &ConvArgs::tile_rows);
  bind_pointer(args, "tile_kptr", &ConvArgs::tile_kptr);
  bind_pointer(args, "tile_cols", &ConvArgs::tile_cols);
  bind_pointer(args, "tc_values", &ConvArgs::tc_values);
  bind_pointer(args, "tc_codebook", &ConvArgs::tc_codebook);
#define SB_FIELD(f) args.def_readwrite(#f, &ConvArgs::f)
  SB_FIELD(act_dtype); SB_FIELD(layout);
  SB_FIELD(N); SB_FIELD(C); SB_FIELD(H); SB_FIELD(W); SB_FIELD(CO); SB_FIELD(KH); SB_FIELD(KW);
  SB_FIELD(stride); SB_FIELD(pad); SB_FIELD(OH); SB_FIELD(OW);
  SB_FIELD(col_bits); SB_FIELD(value_kind); SB_FIELD(bits); SB_FIELD(codebook_stride); SB_FIELD(relu);
  SB_FIELD(tile_col_bits); SB_FIELD(groups); SB_FIELD(tile_steps); SB_FIELD(tc_kind); SB_FIELD(tc_codebook_stride); SB_FIELD(tc_pairs);
  SB_FIELD(variant); SB_FIELD(nnz); SB_FIELD(max_row); SB_FIELD(plan);
#undef SB_FIELD

  m.def(
      "conv2d",
      [](const ConvArgs& a, uintptr_t stream) {
        check_args(a);
        const std::string err = launch_conv(a, reinterpret_cast<void*>(stream));
        if (!err.empty()) throw std::runtime_error("sparsebench._C.conv2d: " + err);
      },
      "Direct sparse convolution (linear = 1x1 conv on a 1x1 image) on the given CUDA stream.", py::arg("args"),
      py::arg("stream"));

  m.def(
      "plan",
      [](const ConvArgs& a) {
        check_args(a);
        return plan_dict(make_plan(a));
      },
      "The kernel and blocking conv2d would use for these args (pointers need only be nonzero where the "
      "kernels need them; queries the device's SM count, an H200's without one).",
      py::arg("args"));

  m.def(
      "tensor_unsupported", [](const ConvArgs& a) { return tensor_unsupported(a); },
      "Why the tensor-core kernels cannot run these args; empty when they can.", py::arg("args"));

  m.def(
      "plan_candidates",
      []() {
        py::list out;
        for (int id = 0; id < plan_candidate_count(); ++id) {
          Tuning t;
          int variant = kAuto;
          plan_candidate(id, t, variant);
          py::dict d = knobs_dict(t);
          d["variant"] = variant_name(variant);
          out.append(d);
        }
        return out;
      },
      "The plans an autotuner may time, by id: each the current knobs with a few changed, and a kernel.");

  m.def(
      "plan_pairs",
      [](int plan) {
        Tuning t = tuning();
        int variant = kAuto;
        if (plan >= 0 && !plan_candidate(plan, t, variant)) throw std::invalid_argument("plan: no such candidate");
        return t.tc_pairs;
      },
      "The 2:4 stream's groups a k-step that candidate `plan` (-1: the rule) reads, 0 for the dense-MMA stream "
      "(ConvArgs.tc_pairs).",
      py::arg("plan"));

  m.def("plan_candidate_count", &plan_candidate_count, "How many candidate plans there are (ids 0..count-1).");

  m.def(
      "set_tuning",
      [](int smem_budget, int rowsplit_max_pixels, int blocks_per_sm, int min_reuse, int virtual_width,
         int rowsplit_warps_per_row, int stage_v, int min_rows, int tc_mt, int tc_pixels, int tc_warps_k,
         int tc_smem_budget, int tc_pack_images, int tc_pairs, int tc_gemm_tile, int tc_wgmma) {
        if (smem_budget < 8192 || smem_budget > 227 * 1024) throw std::invalid_argument("smem_budget: expected 8192..232448 bytes");
        if (blocks_per_sm < 1 || blocks_per_sm > 32) throw std::invalid_argument("blocks_per_sm: expected 1..32");
        if (rowsplit_warps_per_row != 0 && rowsplit_warps_per_row != 1 && rowsplit_warps_per_row != 2 &&
            rowsplit_warps_per_row != 4)
          throw std::invalid_argument("rowsplit_warps_per_row: expected 0 (automatic), 1, 2 or 4");
        if (stage_v != 0 && stage_v != 1 && stage_v != 2 && stage_v != 4)
          throw std::invalid_argument("stage_v: expected 0 (automatic), 1, 2 or 4");
        if (min_rows < 1) throw std::invalid_argument("min_rows: expected an integer >= 1");
        if (tc_mt != 1 && tc_mt != 2 && tc_mt != 4 && tc_mt != 8) throw std::invalid_argument("tc_mt: expected 1, 2, 4 or 8");
        if (tc_pixels < 16 || tc_pixels > 1024) throw std::invalid_argument("tc_pixels: expected 16..1024");
        if (tc_warps_k != 1 && tc_warps_k != 2 && tc_warps_k != 4 && tc_warps_k != 8)
          throw std::invalid_argument("tc_warps_k: expected 1, 2, 4 or 8");
        if (tc_smem_budget < 8192 || tc_smem_budget > 227 * 1024)
          throw std::invalid_argument("tc_smem_budget: expected 8192..232448 bytes");
        if (!valid_tc_pairs(tc_pairs)) throw std::invalid_argument(std::string("tc_pairs: expected ") + kTcPairsAllowed);
        if (tc_gemm_tile < 0 || tc_gemm_tile >= kGemmTileCount)
          throw std::invalid_argument("tc_gemm_tile: expected 0.." + std::to_string(kGemmTileCount - 1) +
                                      " (the implicit-GEMM kernel's block tiles)");
        if (tc_wgmma != 0 && tc_wgmma != 1) throw std::invalid_argument("tc_wgmma: expected 0 or 1");
        Tuning& t = tuning();
        t.smem_budget = smem_budget;
        t.rowsplit_max_pixels = rowsplit_max_pixels;
        t.blocks_per_sm = blocks_per_sm;
        t.min_reuse = std::max(1, min_reuse);
        t.virtual_width = virtual_width ? 1 : 0;
        t.rowsplit_warps_per_row = rowsplit_warps_per_row;
        t.stage_v = stage_v;
        t.min_rows = min_rows;
        t.tc_mt = tc_mt;
        t.tc_pixels = tc_pixels;
        t.tc_warps_k = tc_warps_k;
        t.tc_smem_budget = tc_smem_budget;
        t.tc_pack_images = tc_pack_images ? 1 : 0;
        t.tc_pairs = tc_pairs;
        t.tc_gemm_tile = tc_gemm_tile;
        t.tc_wgmma = tc_wgmma;
      },
      "Change the dispatcher's knobs (for benchmarks).", py::arg("smem_budget") = 100 * 1024,
      py::arg("rowsplit_max_pixels") = 512, py::arg("blocks_per_sm") = 2, py::arg("min_reuse") = 24,
      py::arg("virtual_width") = 1, py::arg("rowsplit_warps_per_row") = 0, py::arg("stage_v") = 0,
      py::arg("min_rows") = 32, py::arg("tc_mt") = 4, py::arg("tc_pixels") = 128, py::arg("tc_warps_k") = 1,
      py::arg("tc_smem_budget") = 96 * 1024, py::arg("tc_pack_images") = 1, py::arg("tc_pairs") = 0,
      py::arg("tc_gemm_tile") = 0, py::arg("tc_wgmma") = 0);

  m.def("get_tuning", []() { return knobs_dict(tuning()); });

  m.def("build_info", []() {
    const std::string sha = SPARSEBENCH_SRC_SHA256;
    py::dict d;
    d["build_id"] = sha.substr(0, 12) + "@" + SPARSEBENCH_BUILT_AT;
    d["source_sha256"] = sha;
    d["built_at"] = SPARSEBENCH_BUILT_AT;
    d["cuda_archs"] = SPARSEBENCH_CUDA_ARCHS;
    d["cuda_runtime_compiled"] = cuda_runtime_version_compiled();
    d["cuda_runtime"] = cuda_runtime_version();
    d["cuda_driver"] = cuda_driver_version();
    py::list kernels;
    for (const char* k : {"conv_stage<V=1,2,4; LINEAR>", "conv_rowsplit<P=16; WPR=1,2,4; CONTIGUOUS>",
                          "conv_tensor<fp16,bf16; MT=1,2,4,8; dense or 2:4 sparse MMAs; values,linear,codebook 8/4/2-bit>",
                          "conv_gemm<fp16,bf16; 7 block tiles; split 2:4 stream>"})
      kernels.append(k);
#ifdef SPARSEBENCH_WGMMA
    kernels.append("conv_wgmma<fp16,bf16; 4 block tiles; second halves by wgmma or mma.sync; split 2:4 stream; sm_90a>");
#endif
    d["kernels"] = py::tuple(kernels);
    return d;
  });
}
