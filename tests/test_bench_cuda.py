"""Speed measurement on the GPU (marked `cuda`: skipped without one)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time

import pytest
import torch
from omegaconf import OmegaConf

from sparsebench.bench import benchmark_model
from sparsebench.bench.backends import cudnn_precision
from sparsebench.bench.cases import synthetic_case
from sparsebench.bench.config import BackendConfig, BenchConfig
from sparsebench.bench.measure import TimingSettings
from sparsebench.bench.suite import LayerBench, plan_backends
from sparsebench.models import build_model
from sparsebench.sparse.ops import plan_candidates
from sparsebench.sparse.timing import time_cuda
from tests.conftest import ROOT

pytestmark = pytest.mark.cuda
GPU = torch.device("cuda") if torch.cuda.is_available() else None
ALL_GPU = ["cudnn_fp32", "cudnn_tf32", "cudnn_fp16", "torch_csr", "semi_structured_2to4"]


def cfgs(activations="fp32", **bench):
    backend = OmegaConf.structured(BackendConfig(name="direct_sparse", activations=activations, fallback=False))
    base = dict(enabled=True, baselines=ALL_GPU, repeats=20, warmup=3, progress=False)
    return backend, OmegaConf.structured(BenchConfig(**{**base, **bench}))


def test_cuda_timing_tells_small_from_big_work():
    a, b = torch.randn(512, 512, device=GPU), torch.randn(4096, 4096, device=GPU)
    for cache in ("flush", "rotate"):
        small = time_cuda([lambda: a @ a], warmup=3, repeats=20, cache=cache)
        big = time_cuda([lambda: b @ b], warmup=3, repeats=20, cache=cache)
        assert 0 < small.median_us < big.median_us
        assert small.runs == 20 and small.spread_us >= 0


def test_host_overhead_is_not_counted_as_gpu_time():
    a = torch.randn(256, 256, device=GPU)
    fast = time_cuda([lambda: a @ a], warmup=3, repeats=20)
    slow_host = time_cuda([lambda: (time.sleep(0.0005), a @ a)], warmup=3, repeats=20)  # 500 us of Python first
    assert slow_host.median_us < fast.median_us + 50


@pytest.mark.parametrize("bits, activations", [(32, "fp32"), (4, "fp32"), (8, "fp16")])
def test_every_gpu_backend_passes_the_check_and_is_timed(bits, activations):
    backend, bench = cfgs(activations)
    plan = plan_backends(backend, bench, GPU)
    assert plan.sparse == "direct_sparse" and plan.baselines == ALL_GPU, plan.skipped
    case = synthetic_case("vgg.conv5", "conv2d", 128, 256, 3, 8, 1, 1, 0.9, bits, torch.Generator().manual_seed(0))
    rows = LayerBench(plan, TimingSettings(warmup=3, repeats=20)).run(case, 2)
    by = {r["backend"]: r for r in rows}
    assert set(by) == {"direct_sparse", *ALL_GPU}
    for r in rows:
        assert r["time_us"] > 0 and r["speedup_vs_cudnn_fp32"] > 0, r
    # TF32 really is off for cudnn_fp32 and allowed for cudnn_tf32. Whether cuDNN's autotuner then picks a
    # TF32 algorithm for this small case is its choice, so that side checks the flags. The fp32 bound leaves
    # room for a Winograd/FFT algorithm that benchmark mode may time fastest on a busy GPU (our sweeps' fp32
    # rows err 1e-7..2.4e-6; this case failed twice in whole-suite runs with the bound at 1e-5, once beside
    # training on the same GPU, tracebacks not kept) and stays under TF32's ~3e-4 (10-bit mantissa).
    assert by["cudnn_fp32"]["max_rel_error"] < 1e-4, by["cudnn_fp32"]
    for tf32 in (False, True):
        with cudnn_precision(tf32):
            assert torch.backends.cudnn.allow_tf32 is tf32 and torch.backends.cuda.matmul.allow_tf32 is tf32
    assert "break_even_vs_cudnn_fp16" in by["direct_sparse"]
    # fp16 convs of ours run in both layouts and the faster counts; fp32 only in NCHW.
    assert by["direct_sparse"]["layout"] in (("nchw", "nhwc") if activations == "fp16" else ("nchw",))
    # Autotuned by default (like cuDNN's benchmark mode): the row names the candidate plan it ran (-1: the rule).
    from sparsebench.sparse.ops import autotune_enabled

    assert autotune_enabled() and by["direct_sparse"]["kernel_plan"] in range(-1, len(plan_candidates()))


def test_autotune_off_runs_the_rule(monkeypatch):
    from sparsebench.sparse import ops

    monkeypatch.setattr(ops, "autotune_plan", lambda *a, **k: pytest.fail("autotune_plan ran with autotune off"))
    backend, bench = cfgs(baselines=["cudnn_fp32"])
    backend.autotune = False
    case = synthetic_case("vgg.conv5", "conv2d", 128, 256, 3, 8, 1, 1, 0.9, 32, torch.Generator().manual_seed(0))
    rows = LayerBench(plan_backends(backend, bench, GPU), TimingSettings(warmup=3, repeats=20)).run(case, 32)
    assert rows[0]["backend"] == "direct_sparse" and rows[0]["kernel_plan"] == -1


def sparse_vgg16() -> torch.nn.Module:
    """A quarter-width VGG-16 on the GPU with 90% of each weight layer zeroed at random."""
    torch.manual_seed(0)
    model = build_model("vgg16", in_channels=3, num_classes=10, image_size=32, width=0.25).to(GPU).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.weight.mul_((torch.rand_like(m.weight) >= 0.9).float())
    return model


def test_fp16_network_of_ours_runs_in_its_faster_layout():
    model = sparse_vgg16()
    backend, bench = cfgs("fp16", batch_sizes=[1], baselines=["cudnn_fp16"], layers=False)
    _, metrics = benchmark_model(backend, bench, model, None, torch.randn(4, 3, 32, 32, device=GPU), GPU)
    assert metrics["network_layout/direct_sparse/b1"] in ("nchw", "nhwc") and metrics["bench/graphs"] is True
    assert metrics["speedup/cudnn_fp16/b1"] > 0 and "network_error/direct_sparse/b1" in metrics
    assert not any(k.startswith(("latency_us/other", "network_error/other")) for k in metrics)


def test_benchmark_model_on_gpu_uses_cuda_graphs_on_both_sides():
    model = sparse_vgg16()
    backend, bench = cfgs(batch_sizes=[1, 8], baselines=["cudnn_fp32", "cudnn_fp16", "torch_csr"])
    rows, metrics = benchmark_model(backend, bench, model, None, torch.randn(4, 3, 32, 32, device=GPU), GPU)
    assert metrics["bench/graphs"] is True and metrics["bench/backend"] == "direct_sparse"
    for b in (1, 8):
        for base in ("cudnn_fp32", "cudnn_fp16", "torch_csr"):
            assert metrics[f"speedup/{base}/b{b}"] > 0
        assert metrics[f"network_error/direct_sparse/b{b}"] < 1e-3
    assert len(rows) == 14 * 2 * 4  # 13 convs + 1 linear, 2 batches, ours + 3 baselines
    listed = set(filter(None, metrics["bench/noisy"].split(", ")))  # exactly the timings that spread widely
    assert listed == {
        f"{k}/b{b}"
        for k in ("direct_sparse", "cudnn_fp32", "cudnn_fp16", "torch_csr")
        for b in (1, 8)
        if metrics[f"latency_spread_us/{k}/b{b}"] > 0.1 * metrics[f"latency_us/{k}/b{b}"]
    }


def test_sweep_cli_on_gpu(tmp_path):
    out = tmp_path / "run"
    env = {
        **os.environ,
        "HYDRA_FULL_ERROR": "0",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "sparsebench.bench.grid",
            "layers=tiny",
            "grid.sparsities=[0.8,0.95]",
            "grid.bits=[32,4]",
            "bench.repeats=20",
            "bench.progress=false",
            f"hydra.run.dir={out}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    with open(out / "bench.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    ours = [r for r in rows if r["backend"] == "direct_sparse"]
    assert len(ours) == 2 * 2 * 2
    assert {r["backend"] for r in rows} >= {"direct_sparse", "cudnn_fp32", "cudnn_tf32", "cudnn_fp16", "torch_csr"}
