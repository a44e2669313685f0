"""`sparsebench-bench` (the kernel-only sweep) and the experiment with the benchmark on, on the CPU."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest

from sparsebench.errors import ConfigError
from tests import cli_process
from tests.conftest import ROOT, TINY, cli_env, run_cli

FAST = ["bench.repeats=20", "bench.warmup=1", "bench.progress=false"]


def run_bench(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``sparsebench-bench ARGS`` as a user would run it (on a machine without a GPU), in a process of its own."""
    return cli_process.run("sparsebench-bench", list(args), ROOT, cli_env(CUDA_VISIBLE_DEVICES=""), timeout)


def read_csv(path: Path) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_sweep_on_cpu_writes_bench_csv_and_a_table(tmp_path):
    out = tmp_path / "run"
    res = run_bench("layers=tiny", "grid.sparsities=[0.5,0.9]", "grid.bits=[32,4]", *FAST, f"hydra.run.dir={out}")
    assert res.returncode == 0, res.stderr[-2000:]
    rows = read_csv(out / "bench.csv")
    ours = [r for r in rows if r["backend"] == "sparse_reference"]
    # 2 layers x 1 batch x 2 sparsities x 2 bit widths for the backend under test
    assert {(r["layer"], r["sparsity"], r["bits"]) for r in ours} == {
        (layer, s, b) for layer in ("conv_8x16@8", "fc_64x32") for s in ("0.5", "0.9") for b in ("32", "4")
    }
    # the dense baseline is timed once per layer (it ignores the mask), torch CSR once per sparsity
    assert len([r for r in rows if r["backend"] == "torch_cpu"]) == 2
    assert len([r for r in rows if r["backend"] == "torch_csr"]) == 4
    for r in ours:
        assert float(r["time_us"]) > 0 and float(r["speedup_vs_torch_cpu"]) > 0
        assert "break_even_vs_torch_cpu" in r
    conv = [r for r in ours if r["layer"] == "conv_8x16@8" and r["sparsity"] == "0.9"]
    assert all(int(r["nnz"]) == round(0.1 * 16 * 8 * 9) for r in conv)
    assert "sparse_reference us" in res.stdout and "conv_8x16@8" in res.stdout  # the printed table
    skipped = [line for line in (res.stdout + res.stderr).splitlines() if "skipped" in line]  # Hydra logs to stdout
    assert len(skipped) == 5  # direct_sparse + 4 GPU baselines, one line each
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["geomean_speedup/torch_cpu/b1/s0.9/4bit"] > 0
    assert (out / "manifest.json").exists()


def test_sweep_over_a_model_config(tmp_path):
    out = tmp_path / "run"
    res = run_bench(
        "model=convnet",
        "model.width=0.25",
        "data=digits",
        "grid.sparsities=[0.9]",
        "grid.bits=[32]",
        "bench.baselines=[torch_cpu]",
        "bench.break_even=false",
        *FAST,
        f"hydra.run.dir={out}",
    )
    assert res.returncode == 0, res.stderr[-2000:]
    rows = read_csv(out / "bench.csv")
    layers = {r["layer"]: r for r in rows if r["backend"] == "sparse_reference"}
    assert set(layers) == {"block1.conv", "block2.conv", "block3.conv", "fc"}
    assert layers["block1.conv"]["in_shape"] == "1x8x8" and layers["fc"]["kind"] == "linear"


def test_sweep_bad_input_is_one_line(tmp_path):
    for args, key in (
        (["layers=vgg99"], "layers=vgg99"),
        (["grid.bits=[3]"], "grid.bits"),
        (["model=vgg16", "layers=tiny"], "layers"),
    ):
        res = run_bench(*args, f"hydra.run.dir={tmp_path / 'bad'}")
        assert res.returncode == 2, res.stderr[-1000:]
        errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and key in errors[0] and "Traceback" not in res.stderr


def test_experiment_with_the_benchmark_on_cpu(tmp_path):
    out = tmp_path / "run"
    res = run_cli(*TINY, "backend=direct_sparse", "bench=quick", "bench.batch_sizes=[1,2]", f"hydra.run.dir={out}")
    assert res.returncode == 0, res.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    for b in (1, 2):
        assert metrics[f"speedup/torch_cpu/b{b}"] > 0 and metrics[f"latency_us/sparse_reference/b{b}"] > 0
    rows = read_csv(out / "layers.csv")
    assert {r["backend"] for r in rows} == {"sparse_reference", "torch_csr", "torch_cpu"}
    assert {r["batch"] for r in rows} == {"1", "2"}
    assert all(float(r["time_us"]) > 0 and r["speedup_vs_torch_cpu"] for r in rows)
    assert "direct_sparse skipped" in res.stdout + res.stderr


def test_row_skew_gives_uneven_rows_with_the_same_sparsity(tmp_path):
    # Trained layers keep long rows for some output channels and empty others; the kernels' load
    # balance needs that case too (docs/kernels.md, "Trained weights: long rows").
    nnz_max = {}  # skew -> (longest row, empty rows)
    for skew in (0, 2):
        out = tmp_path / f"skew{skew}"
        res = run_bench(
            "layers=tiny",
            "grid.sparsities=[0.9]",
            "grid.bits=[32]",
            f"grid.row_skew={skew}",
            "bench.baselines=[torch_cpu]",
            "bench.break_even=false",
            *FAST,
            f"hydra.run.dir={out}",
        )
        assert res.returncode == 0, res.stderr[-2000:]
        conv = [
            r for r in read_csv(out / "bench.csv") if r["layer"] == "conv_8x16@8" and r["backend"] == "sparse_reference"
        ]
        assert [int(r["nnz"]) for r in conv] == [round(0.1 * 16 * 8 * 9)]  # 115 of 1152: the sparsity holds
        nnz_max[skew] = (int(conv[0]["row_nnz_max"]), int(conv[0]["rows_empty"]))
    mean_row = 115 / 16
    assert nnz_max[0][0] < 2 * mean_row and nnz_max[0][1] == 0
    assert nnz_max[2][0] > 3 * mean_row and nnz_max[2][1] >= 2  # a few long rows, some empty ones


def test_negative_row_skew_is_refused(tmp_path):
    res = run_bench("layers=tiny", "grid.row_skew=-1", f"hydra.run.dir={tmp_path}")
    assert res.returncode == 2 and "grid.row_skew=-1" in res.stderr and "a number >= 0" in res.stderr


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["+backend.tuning.rowsplit_warps_per_row=3"],
            "backend.tuning.rowsplit_warps_per_row=3 is not allowed: 0 (automatic), 1, 2 or 4",
        ),
        (["+backend.tuning.warps=2"], "backend.tuning.warps=2 is not allowed: a knob of the kernels: smem_budget, "),
        (["+backend.tuning.blocks_per_sm=0"], "backend.tuning.blocks_per_sm=0 is not allowed: 1..32"),
        (["+backend.tuning.tc_mt=3"], "backend.tuning.tc_mt=3 is not allowed: 1, 2, 4 or 8 (m16 pixel tiles"),
        (
            ["+backend.tuning.rowsplit_max_pixels=3000000000"],
            "backend.tuning.rowsplit_max_pixels=3000000000 is not allowed",
        ),
        (["backend=torch_csr", "+backend.tuning.min_reuse=4"], "only with backend=direct_sparse"),
        (
            ["+backend.tuning.min_reuse=12"],
            "backend.tuning.min_reuse=12 is not allowed: only with backend.autotune=false",
        ),
    ],
)
def test_bad_kernel_tuning_is_refused(overrides, message):
    from hydra import compose, initialize_config_dir

    from sparsebench.bench.grid import validate
    from sparsebench.hydra_app import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("grid", overrides=["layers=tiny", *overrides])
    with pytest.raises(ConfigError) as refused:
        validate(cfg, overrides)
    assert message in str(refused.value)


def test_kernel_tuning_knobs_are_the_modules_own():
    from sparsebench.bench.config import KERNEL_TUNING
    from sparsebench.sparse.ops import _C

    if _C is None:
        pytest.skip("sparsebench._C is not built here")
    defaults = _C.get_tuning()
    assert set(defaults) == set(KERNEL_TUNING)
    assert all(KERNEL_TUNING[knob][1](value) for knob, value in defaults.items())  # every default passes its own check
