// The one pybind11 file: raw device pointers and sizes in, nothing allocated, no libtorch.
// Python passes tensor.data_ptr() and torch.cuda.current_stream().cuda_stream.
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

template <typename P>
P* ptr(uintptr_t v) {
  return reinterpret_cast<P*>(v);
}

void check_plan(int plan, int variant) {
  if (plan < -1 || plan >= plan_candidate_count())
    throw std::invalid_argument("plan: expected -1 (the dispatcher's rule) or a candidate id 0.." +
                                std::to_string(plan_candidate_count() - 1));
  if (plan >= 0 && variant != kAuto)
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
  return d;
}

ConvArgs make_args(uintptr_t x, uintptr_t out, int act_dtype, int N, int C, int H, int W, int CO, int KH, int KW,
                   int stride, int pad, int OH, int OW, uintptr_t rowptr, uintptr_t colidx, int col_bits,
                   uintptr_t row_order, uintptr_t values, int value_kind, int bits, uintptr_t scale,
                   uintptr_t zero_point, uintptr_t codebook, int codebook_stride, uintptr_t bias, bool relu,
                   int variant, int64_t nnz, int64_t max_row, int plan) {
  if (act_dtype < kF32 || act_dtype > kBF16) throw std::invalid_argument("act_dtype: expected 0 (f32), 1 (f16), 2 (bf16)");
  if (value_kind < kValF32 || value_kind > kValCodebook) throw std::invalid_argument("value_kind: expected 0..3");
  if (col_bits != 16 && col_bits != 32) throw std::invalid_argument("col_bits: expected 16 or 32");
  if (value_kind >= kValLinear && bits != 2 && bits != 4 && bits != 8) throw std::invalid_argument("bits: expected 2, 4 or 8");
  if (variant < kAuto || variant > kRowSplit) throw std::invalid_argument("variant: expected 0 (auto), 1 (stage), 2 (rowsplit)");
  if (codebook_stride < 0 || (codebook_stride > 0 && (value_kind != kValCodebook || codebook_stride > (1 << bits))))
    throw std::invalid_argument("codebook_stride: expected 0 (one codebook for the layer) or 1..2**bits (the levels of each row's codebook)");
  if (stride < 1 || pad < 0 || KH < 1 || KW < 1) throw std::invalid_argument("stride >= 1, pad >= 0, kernel >= 1 required");
  check_plan(plan, variant);
  ConvArgs a;
  a.x = ptr<const void>(x);
  a.out = ptr<void>(out);
  a.act_dtype = act_dtype;
  a.N = N; a.C = C; a.H = H; a.W = W; a.CO = CO; a.KH = KH; a.KW = KW;
  a.stride = stride; a.pad = pad; a.OH = OH; a.OW = OW;
  a.rowptr = ptr<const int32_t>(rowptr);
  a.colidx = ptr<const void>(colidx);
  a.col_bits = col_bits;
  a.row_order = ptr<const int32_t>(row_order);
  a.values = ptr<const void>(values);
  a.value_kind = value_kind;
  a.bits = bits;
  a.scale = ptr<const float>(scale);
  a.zero_point = ptr<const int32_t>(zero_point);
  a.codebook = ptr<const float>(codebook);
  a.codebook_stride = codebook_stride;
  a.bias = ptr<const float>(bias);
  a.relu = relu ? 1 : 0;
  a.variant = variant;
  a.nnz = nnz;
  a.max_row = max_row;
  a.plan = plan;
  return a;
}

py::dict plan_dict(const Plan& p) {
  py::dict d;
  d["variant"] = p.variant == kStage ? "stage" : "rowsplit";
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
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "sparsebench CUDA kernels: direct sparse conv2d / linear over the packed CSR format";

  m.def(
      "conv2d",
      [](uintptr_t x, uintptr_t out, int act_dtype, int N, int C, int H, int W, int CO, int KH, int KW, int stride,
         int pad, int OH, int OW, uintptr_t rowptr, uintptr_t colidx, int col_bits, uintptr_t row_order,
         uintptr_t values, int value_kind, int bits, uintptr_t scale, uintptr_t zero_point, uintptr_t codebook,
         int codebook_stride, uintptr_t bias, bool relu, int variant, int64_t nnz, int64_t max_row, int plan,
         uintptr_t stream) {
        const ConvArgs a = make_args(x, out, act_dtype, N, C, H, W, CO, KH, KW, stride, pad, OH, OW, rowptr, colidx,
                                     col_bits, row_order, values, value_kind, bits, scale, zero_point, codebook,
                                     codebook_stride, bias, relu, variant, nnz, max_row, plan);
        const std::string err = launch_conv(a, reinterpret_cast<void*>(stream));
        if (!err.empty()) throw std::runtime_error("sparsebench._C.conv2d: " + err);
      },
      "Direct sparse convolution (linear = 1x1 conv on a 1x1 image) on the given CUDA stream. "
      "Pointers are device addresses; 0 means absent for row_order/scale/zero_point/codebook/bias; "
      "codebook_stride: levels per output channel's codebook (row r's starts at codebook + r * stride), "
      "0 for one codebook for the layer; "
      "nnz and max_row (the longest row's nonzeros) pick the blocking; 0 means unknown. "
      "plan: a candidate id from plan_candidates() to run instead of the dispatcher's rule (-1).",
      py::arg("x"), py::arg("out"), py::arg("act_dtype"), py::arg("N"), py::arg("C"), py::arg("H"), py::arg("W"),
      py::arg("CO"), py::arg("KH"), py::arg("KW"), py::arg("stride"), py::arg("pad"), py::arg("OH"), py::arg("OW"),
      py::arg("rowptr"), py::arg("colidx"), py::arg("col_bits"), py::arg("row_order"), py::arg("values"),
      py::arg("value_kind"), py::arg("bits"), py::arg("scale"), py::arg("zero_point"), py::arg("codebook"),
      py::arg("codebook_stride"), py::arg("bias"), py::arg("relu"), py::arg("variant"), py::arg("nnz"),
      py::arg("max_row"), py::arg("plan"), py::arg("stream"));

  m.def(
      "plan",
      [](int N, int C, int H, int W, int CO, int KH, int KW, int stride, int pad, int OH, int OW, int variant,
         int64_t nnz, int64_t max_row, int plan) {
        check_plan(plan, variant);
        ConvArgs a;
        a.nnz = nnz;
        a.max_row = max_row;
        a.plan = plan;
        a.N = N; a.C = C; a.H = H; a.W = W; a.CO = CO; a.KH = KH; a.KW = KW;
        a.stride = stride; a.pad = pad; a.OH = OH; a.OW = OW; a.variant = variant;
        return plan_dict(make_plan(a));
      },
      "The kernel and blocking conv2d would use for this geometry (queries the device's SM count).",
      py::arg("N"), py::arg("C"), py::arg("H"), py::arg("W"), py::arg("CO"), py::arg("KH"), py::arg("KW"),
      py::arg("stride"), py::arg("pad"), py::arg("OH"), py::arg("OW"), py::arg("variant") = 0, py::arg("nnz") = 0,
      py::arg("max_row") = 0, py::arg("plan") = -1);

  m.def(
      "plan_candidates",
      []() {
        py::list out;
        for (int id = 0; id < plan_candidate_count(); ++id) {
          Tuning t;
          int variant = kAuto;
          plan_candidate(id, t, variant);
          py::dict d = knobs_dict(t);
          d["variant"] = variant == kStage ? "stage" : "rowsplit";
          out.append(d);
        }
        return out;
      },
      "The plans an autotuner may time, by id: each the current knobs with a few changed, and a kernel.");

  m.def("plan_candidate_count", &plan_candidate_count, "How many candidate plans there are (ids 0..count-1).");

  m.def(
      "set_tuning",
      [](int smem_budget, int rowsplit_max_pixels, int blocks_per_sm, int min_reuse, int virtual_width,
         int rowsplit_warps_per_row, int stage_v, int min_rows) {
        if (smem_budget < 8192 || smem_budget > 227 * 1024) throw std::invalid_argument("smem_budget: expected 8192..232448 bytes");
        if (blocks_per_sm < 1 || blocks_per_sm > 32) throw std::invalid_argument("blocks_per_sm: expected 1..32");
        if (rowsplit_warps_per_row != 0 && rowsplit_warps_per_row != 1 && rowsplit_warps_per_row != 2 &&
            rowsplit_warps_per_row != 4)
          throw std::invalid_argument("rowsplit_warps_per_row: expected 0 (automatic), 1, 2 or 4");
        if (stage_v != 0 && stage_v != 1 && stage_v != 2 && stage_v != 4)
          throw std::invalid_argument("stage_v: expected 0 (automatic), 1, 2 or 4");
        if (min_rows < 1) throw std::invalid_argument("min_rows: expected an integer >= 1");
        Tuning& t = tuning();
        t.smem_budget = smem_budget;
        t.rowsplit_max_pixels = rowsplit_max_pixels;
        t.blocks_per_sm = blocks_per_sm;
        t.min_reuse = std::max(1, min_reuse);
        t.virtual_width = virtual_width ? 1 : 0;
        t.rowsplit_warps_per_row = rowsplit_warps_per_row;
        t.stage_v = stage_v;
        t.min_rows = min_rows;
      },
      "Change the dispatcher's knobs (for benchmarks).", py::arg("smem_budget") = 100 * 1024,
      py::arg("rowsplit_max_pixels") = 512, py::arg("blocks_per_sm") = 2, py::arg("min_reuse") = 24,
      py::arg("virtual_width") = 1, py::arg("rowsplit_warps_per_row") = 0, py::arg("stage_v") = 0, py::arg("min_rows") = 32);

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
    d["kernels"] = py::make_tuple("conv_stage<V=1,2,4; LINEAR>", "conv_rowsplit<P=16; WPR=1,2,4; CONTIGUOUS>");
    return d;
  });
}
