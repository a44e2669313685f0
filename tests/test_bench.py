"""Speed measurement on the CPU: registry, timing, correctness checks, break-even, rows and metrics."""

from __future__ import annotations

import logging
import time

import pytest
import torch
from omegaconf import OmegaConf

from sparsebench.bench import benchmark_model
from sparsebench.bench.backends import BACKENDS, Backend, Prepared, faster_layout, prune_2to4
from sparsebench.bench.cases import cases_from_model, synthetic_case, thin
from sparsebench.bench.config import BACKEND_NAMES, SPARSE_BACKEND_NAMES, BackendConfig, BenchConfig, validate_bench
from sparsebench.bench.measure import (
    MismatchError,
    TimingSettings,
    break_even_sparsity,
    check,
    fit_time_vs_nnz,
    fp16_tensor_peak_tflops,
    reference_output,
    result_row,
)
from sparsebench.bench.suite import LayerBench, plan_backends
from sparsebench.errors import ConfigError
from sparsebench.models import build_model
from sparsebench.sparse.timing import summarize, time_cpu
from tests.conftest import compose

CPU = torch.device("cpu")
FAST = TimingSettings(warmup=1, repeats=20)


def bench_cfg(**kw):
    base = dict(
        enabled=True,
        baselines=["cudnn_fp32", "cudnn_fp16", "torch_csr", "semi_structured_2to4", "torch_cpu"],
        repeats=20,
        warmup=1,
        progress=False,
    )
    return OmegaConf.structured(BenchConfig(**{**base, **kw}))


def backend_cfg(**kw):
    return OmegaConf.structured(BackendConfig(**{"name": "direct_sparse", **kw}))


def tiny_model(sparsity: float = 0.7) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("convnet", in_channels=1, num_classes=10, image_size=8, width=0.25).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.weight.mul_((torch.rand_like(m.weight) >= sparsity).float())
            if isinstance(m, torch.nn.BatchNorm2d):  # non-trivial running stats
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model


# ------------------------------------------------------------------ registry and config


def test_registry_matches_config_names_and_has_the_issue_backends():
    assert set(BACKENDS) == set(BACKEND_NAMES)
    for name in (
        "cudnn_fp32",
        "cudnn_tf32",
        "cudnn_fp16",
        "direct_sparse",
        "torch_csr",
        "semi_structured_2to4",
        "torch_cpu",
    ):
        assert name in BACKENDS
    assert set(SPARSE_BACKEND_NAMES) - {"none"} <= {n for n, b in BACKENDS.items() if b.sparse}
    assert not BACKENDS["cudnn_fp16"].sparse and BACKENDS["direct_sparse"].sparse


@pytest.mark.parametrize(
    "override, key",
    [
        ("backend.name=cudnn_fp32", "backend.name"),
        ("bench.repeats=5", "bench.repeats"),
        ("bench.cache=none", "bench.cache"),
        ("bench.baselines=[cudnn_fp64]", "bench.baselines"),
        ("bench.batch_sizes=[0]", "bench.batch_sizes"),
    ],
)
def test_bad_bench_settings_name_the_key(override, key):
    cfg = compose("backend=direct_sparse", "bench=default", override)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_bench(cfg.backend, cfg.bench)


def test_bench_needs_a_sparse_backend_and_fp16_is_direct_sparse_only():
    assert compose("bench=default").backend.name == "direct_sparse"  # bench=default picks our kernels
    cfg = compose("bench=default", "backend=none")
    with pytest.raises(ConfigError, match="backend.name"):
        validate_bench(cfg.backend, cfg.bench)
    cfg = compose("backend=torch_csr", "bench=default", "backend.activations=fp16")
    with pytest.raises(ConfigError, match="backend.activations"):
        validate_bench(cfg.backend, cfg.bench)
    cfg = compose("backend=direct_sparse_fp16", "bench=full")
    validate_bench(cfg.backend, cfg.bench)
    assert list(cfg.bench.batch_sizes) == [1, 32, 128] and cfg.backend.activations == "fp16"


def test_cpu_plan_falls_back_and_logs_one_line_per_skipped_gpu_backend(caplog, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="sparsebench.bench"):
        plan = plan_backends(backend_cfg(), bench_cfg(), CPU)
    assert plan.sparse == "sparse_reference" and plan.device == CPU
    assert plan.baselines == ["torch_csr", "torch_cpu"]
    assert set(plan.skipped) == {"direct_sparse", "cudnn_fp32", "cudnn_fp16", "semi_structured_2to4"}
    for name in plan.skipped:
        lines = [r.getMessage() for r in caplog.records if f" {name} skipped" in r.getMessage()]
        assert len(lines) == 1 and "CUDA" in lines[0]
    with pytest.raises(ConfigError, match="backend.name=direct_sparse cannot run here"):
        plan_backends(backend_cfg(fallback=False), bench_cfg(), CPU)


# ------------------------------------------------------------------ timing


def test_cpu_timing_measures_a_known_duration():
    t = time_cpu([lambda: time.sleep(0.002)], warmup=1, repeats=20)
    assert t.runs == 20
    assert 1900 <= t.median_us < 50_000
    assert t.p25_us <= t.median_us <= t.p75_us and t.spread_us >= 0


def test_a_timing_is_noisy_when_its_quartiles_spread_past_a_tenth_of_the_median():
    assert not summarize([100.0, 101, 99, 100, 102, 98, 100]).noisy  # an idle device: 2% spread
    busy = summarize([100.0, 160, 95, 150, 100, 170, 98, 140])  # another job's kernels in some samples
    assert busy.spread_us > 10 and busy.noisy


def test_peak_share_is_the_real_work_over_the_gpus_fp16_peak(monkeypatch):
    assert fp16_tensor_peak_tflops(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert fp16_tensor_peak_tflops(torch.device("cuda", 0)) == 989.4
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce GTX 1080")
    assert fp16_tensor_peak_tflops(torch.device("cuda", 0)) is None  # unknown card: no share, no guess
    case = synthetic_case("c", "conv2d", 16, 32, 3, 8, 1, 1, 0.9, 32, torch.Generator().manual_seed(0))
    prepared = Prepared(
        run=lambda x: x, convert=lambda x: x, weight=case.weight, tol=0.0, weight_bytes=0, act_bytes=4, sparse=True
    )
    timing = summarize([10.0])  # 10 us
    row = result_row(case, "ours", 4, timing, prepared, 0.0, peak_tflops=989.4)
    tflops = case.sparse_flops(4) / 10e-6 / 1e12
    assert row["gflops"] == pytest.approx(tflops * 1e3, abs=1e-3)  # rounded to 3 decimals
    assert row["peak_share"] == pytest.approx(tflops / 989.4, rel=1e-3)  # 4 significant digits
    assert result_row(case, "ours", 4, timing, prepared, 0.0)["peak_share"] is None


def test_grid_summary_has_the_median_peak_share_of_our_rows():
    from sparsebench.bench.grid_run import summarize as grid_summary

    rows = [
        dict(backend="ours", batch=32, sparsity=0.9, bits=16, speedup_vs_cudnn_fp16=s, peak_share=p)
        for s, p in ((0.5, 0.01), (2.0, 0.03), (1.0, 0.02))
    ]
    rows.append(dict(backend="cudnn_fp16", batch=32, sparsity=None, bits=None, peak_share=0.3))
    out = grid_summary(rows, "ours")
    assert out["geomean_speedup/cudnn_fp16/b32/s0.9/16bit"] == pytest.approx(1.0)
    assert out["median_peak_share/b32/s0.9/16bit"] == 0.02  # ours only, the median of three
    rows = [{**r, "peak_share": None} for r in rows]
    assert not any(k.startswith("median_peak_share") for k in grid_summary(rows, "ours"))  # an unknown GPU


def test_summarize_median_and_iqr():
    t = summarize([float(v) for v in range(1, 102)])  # 1..101
    assert t.median_us == 51 and t.p25_us == 26 and t.p75_us == 76 and t.spread_us == 50


# ------------------------------------------------------------------ cases


def test_synthetic_case_has_the_requested_sparsity_and_bits():
    g = torch.Generator().manual_seed(0)
    case = synthetic_case("c", "conv2d", 16, 32, 3, 8, 1, 1, 0.9, 4, g)
    assert case.packed.bits == 4 and case.packed.value_kind == "linear"
    assert case.packed.nnz == round(0.1 * 32 * 16 * 9)
    assert int((case.weight != 0).sum()) == case.packed.nnz  # no kept weight rounded to zero
    assert case.out_shape() == (32, 8, 8)
    assert case.dense_flops(2) == 2 * 2 * 64 * 32 * 144


def test_thin_keeps_a_subset_of_the_nonzeros():
    g = torch.Generator().manual_seed(0)
    for bits in (32, 8):
        case = synthetic_case("c", "conv2d", 16, 32, 3, 8, 1, 1, 0.5, bits, g)
        thinned = thin(case.packed, 0.25, torch.Generator().manual_seed(1))
        w, wt = case.weight, thinned.dequantize()
        assert 0.15 < thinned.nnz / case.packed.nnz < 0.35
        assert torch.equal(wt[wt != 0], w[wt != 0])  # kept values unchanged
        assert bool(((wt != 0).reshape(32, -1).sum(1) >= 1).all())  # no row emptied


def test_cases_from_model_capture_real_input_shapes():
    model = tiny_model()
    cases = cases_from_model(model, torch.randn(4, 1, 8, 8))
    by_name = {c.name: c for c in cases}
    assert by_name["block1.conv"].in_shape == (1, 8, 8)
    assert by_name["fc"].kind == "linear" and len(by_name["fc"].in_shape) == 1
    for c in cases:
        assert torch.equal(c.weight, dict(model.named_modules())[c.name].weight.detach())


def test_prune_2to4_keeps_two_of_every_four():
    w = torch.randn(8, 64)
    p = prune_2to4(w)
    assert bool(((p.reshape(8, 16, 4) != 0).sum(-1) == 2).all())


# ------------------------------------------------------------------ correctness checks


def _case():
    return synthetic_case("c", "conv2d", 8, 16, 3, 6, 1, 1, 0.8, 32, torch.Generator().manual_seed(0))


def test_check_accepts_a_right_and_rejects_a_wrong_backend():
    case = _case()
    x = torch.randn(2, *case.in_shape)
    right = BACKENDS["torch_cpu"].prepare(case, CPU, "fp32")
    assert check(case, "torch_cpu", right, x, 2) < 1e-6
    off = Prepared(
        run=lambda x: right.run(x) * 1.01,
        convert=right.convert,
        weight=case.weight,
        tol=1e-4,
        weight_bytes=0,
        act_bytes=4,
        sparse=False,
    )
    with pytest.raises(MismatchError, match="computes layer c"):
        check(case, "off", off, x, 2)


def test_a_wrong_backend_is_an_error_not_a_row(monkeypatch):
    def prepare_wrong(case, device, activations):
        good = BACKENDS["torch_cpu"].prepare(case, device, activations)
        return Prepared(
            run=lambda x: good.run(x).flip(1),
            convert=good.convert,
            weight=case.weight,
            tol=1e-4,
            weight_bytes=0,
            act_bytes=4,
            sparse=False,
        )

    monkeypatch.setitem(BACKENDS, "wrong", Backend("wrong", ("cpu",), False, prepare_wrong))
    plan = plan_backends(backend_cfg(name="sparse_reference"), bench_cfg(baselines=["torch_cpu", "wrong"]), CPU)
    with pytest.raises(MismatchError, match="backend wrong"):
        LayerBench(plan, FAST).run(_case(), 1)


def test_a_freed_weight_never_lends_its_reference_to_the_next():
    # A baseline with its own weight (2:4) is freed before the thinned layer's weight is made; CPython
    # reuses the freed object's address, so a cache keyed by ids alone returned the 2:4 weight's output
    # (seen on the H200 as a false direct_sparse "mismatch" of the thinned break-even layer).
    plan = plan_backends(backend_cfg(name="sparse_reference"), bench_cfg(baselines=["torch_cpu"]), CPU)
    bench, case = LayerBench(plan, FAST), _case()
    x = torch.randn(2, *case.in_shape)
    for scale in range(1, 9):
        weight = case.weight * scale  # the only new object: it gets a freed address if there is one
        got = bench._reference(case, weight, x)
        assert torch.equal(got, reference_output(case, weight, x)), scale
        del weight, got


# ------------------------------------------------------------------ break-even


def test_break_even_from_a_linear_fit():
    points = [(1000, 110.0), (250, 35.0)]  # t = 10 + 0.1 * nnz
    assert fit_time_vs_nnz(points) == pytest.approx((10.0, 0.1))
    assert break_even_sparsity(points, 60.0, 2000) == pytest.approx(0.75)  # 500 nnz of 2000
    assert break_even_sparsity(points, 9.0, 2000) is None  # the fixed cost alone is slower
    assert break_even_sparsity(points, 500.0, 2000) == 0.0  # wins even dense
    assert break_even_sparsity([(1000, 1.0)], 5.0, 2000) is None  # one point: no fit


# ------------------------------------------------------------------ the experiment's benchmark


def test_benchmark_model_rows_and_metrics_on_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = tiny_model()
    rows, metrics = benchmark_model(
        backend_cfg(), bench_cfg(batch_sizes=[1, 3]), model, None, torch.randn(4, 1, 8, 8), CPU
    )
    layers = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    backends = ("sparse_reference", "torch_csr", "torch_cpu")
    assert len(rows) == len(layers) * 2 * len(backends)
    assert {(r["layer"], r["batch"], r["backend"]) for r in rows} == {
        (n, b, k) for n in layers for b in (1, 3) for k in backends
    }
    required = (
        "layer",
        "kind",
        "in_shape",
        "out_channels",
        "kernel",
        "stride",
        "sparsity",
        "bits",
        "backend",
        "batch",
        "time_us",
        "spread_us",
        "speedup_vs_torch_cpu",
        "speedup_vs_torch_csr",
        "flops",
        "bytes",
        "gflops",
    )
    for r in rows:
        assert all(k in r for k in required), set(required) - set(r)
        assert r["time_us"] > 0 and r["spread_us"] >= 0 and r["flops"] > 0
        w = dict(model.named_modules())[r["layer"]].weight
        assert r["sparsity"] == pytest.approx(float((w == 0).float().mean()), abs=1e-5)
    ours = [r for r in rows if r["backend"] == "sparse_reference"]
    assert all("break_even_vs_torch_cpu" in r for r in ours)
    cpu_row = next(r for r in rows if r["backend"] == "torch_cpu")
    assert cpu_row["speedup_vs_torch_cpu"] == 1.0
    for b in (1, 3):
        for base in ("torch_cpu", "torch_csr"):
            lat = metrics[f"latency_us/{base}/b{b}"]
            assert metrics[f"speedup/{base}/b{b}"] == pytest.approx(
                lat / metrics[f"latency_us/sparse_reference/b{b}"], rel=1e-3
            )
        assert metrics[f"network_error/sparse_reference/b{b}"] < 1e-5
    assert metrics["bench/backend"] == "sparse_reference" and "cudnn_fp32" in metrics["bench/skipped"]
    assert metrics["bench/noisy"] == ""  # only GPU timings are judged: a CPU's jitter more


SLOW_S = 0.005  # far above the tiny model's compute, even on a loaded 2-core machine


def _two_layout_backend(slow_layout: str):
    """sparse_reference that also runs in another layout; the one named ``slow_layout`` waits SLOW_S a call."""
    reference = BACKENDS["sparse_reference"]

    def prepare(case, device, activations, channels_last=None):
        good = reference.prepare(case, device, activations)
        conv = case.kind == "conv2d"
        layout = "nhwc" if (channels_last is None and conv) or channels_last else "nchw"
        primary_conv = conv and channels_last is None

        def run(x):
            if layout == slow_layout:
                time.sleep(SLOW_S)
            return good.run(x)

        return Prepared(
            run=run,
            convert=good.convert,
            weight=case.weight,
            tol=good.tol,
            weight_bytes=good.weight_bytes,
            act_bytes=4,
            sparse=True,
            channels_last=layout == "nhwc",
            other_layout=(lambda: prepare(case, device, activations, False)) if primary_conv else None,
        )

    return Backend("sparse_reference", ("cpu",), True, prepare)


@pytest.mark.parametrize("slow, kept", [("nhwc", "nchw"), ("nchw", "nhwc")])
def test_ours_is_timed_in_both_layouts_and_the_faster_counts(monkeypatch, slow, kept):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(BACKENDS, "sparse_reference", _two_layout_backend(slow))
    model = tiny_model()
    rows, metrics = benchmark_model(
        backend_cfg(), bench_cfg(baselines=["torch_cpu"]), model, None, torch.randn(4, 1, 8, 8), CPU
    )
    convs = [r for r in rows if r["backend"] == "sparse_reference" and r["kind"] == "conv2d"]
    assert convs and all(r["layout"] == kept and r["time_us"] < 1500 for r in convs)
    assert all("break_even_vs_torch_cpu" in r for r in convs)  # its second point timed in the same layout
    linears = [r for r in rows if r["backend"] == "sparse_reference" and r["kind"] == "linear"]
    assert linears and all(r["layout"] == "nchw" for r in linears)  # one layout: slow if that is the slow one
    assert metrics["network_layout/sparse_reference/b1"] == kept
    n_slow = sum(1 for r in convs) + (len(linears) if slow == "nchw" else 0)  # sleeps in the slow network
    assert metrics["latency_us/sparse_reference/b1"] < n_slow * SLOW_S * 1e6
    assert metrics["network_error/sparse_reference/b1"] < 1e-5
    assert not any(k.startswith(("latency_us/other", "speedup/other", "network_error/other")) for k in metrics)


def test_the_other_layout_counts_only_when_clearly_faster():
    assert faster_layout(100.0, 90.0) and not faster_layout(100.0, 98.0) and not faster_layout(100.0, 120.0)


def test_benchmark_disabled_returns_nothing():
    assert benchmark_model(
        backend_cfg(), bench_cfg(enabled=False), tiny_model(), None, torch.randn(1, 1, 8, 8), CPU
    ) == ([], {})
