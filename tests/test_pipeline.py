"""End to end: the CLI's run directory, resume equality, W&B offline files."""

import csv
import json
from pathlib import Path

import pytest
import torch

import sparsebench.checkpoints
import sparsebench.train
from sparsebench.errors import ConfigError
from sparsebench.experiment import run
from sparsebench.sparse.format import load_packed
from tests.conftest import DENSE, TINY, compose, run_cli

METRIC_KEYS = {
    "status",
    "acc_dense",
    "acc_final",
    "sparsity",
    "weight_bits",
    "dense_bytes",
    "footprint_bytes",
    "compression",
    "runtime_s",
}
LAYER_COLUMNS = {
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
}


def test_cli_default_experiment_writes_the_contracted_files(tmp_path: Path):
    # The default experiment (agp to 90%, 8-bit QAT, benchmark), its retraining shortened by one key alone:
    # the schedules are fractions of the phase, so they shrink with it.
    result = run_cli(*TINY, "trainer.epochs=3", "trainer.finetune_epochs=2", "bench=quick", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    for name in (
        ".hydra/config.yaml",
        "manifest.json",
        "metrics.json",
        "layers.csv",
        "dense.pt",
        "checkpoints/last.pt",
        "packed.safetensors",
    ):
        assert (tmp_path / name).exists(), name

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert METRIC_KEYS <= metrics.keys()
    # The run tells its user what it found, and where.
    told = result.stdout.splitlines()
    assert f"sparsebench: ok in {metrics['runtime_s']:.1f} s -> {tmp_path}" in told
    assert any(line.startswith("  accuracy  dense ") for line in told)
    assert any(line.startswith("  speedup   whole network, ") for line in told)
    assert metrics["status"] == "ok"
    assert 0.8 < metrics["acc_dense"] <= 1.0  # 3 epochs of a quarter-width convnet on digits
    assert metrics["acc_final"] > metrics["acc_dense"] - 0.1
    assert metrics["weight_bits"] == 8 and metrics["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert metrics["compression"] == pytest.approx(metrics["dense_bytes"] / metrics["footprint_bytes"])
    assert metrics["compression"] > 4  # 8-bit codes of a tenth of the weights, plus indices
    assert metrics["dense/step_ms"] > 0 and metrics["finetune/step_ms"] > 0
    phases = {k: v for k, v in metrics.items() if k.startswith("phase_s/")}  # where runtime_s went
    assert set(phases) == {f"phase_s/{p}" for p in ("setup", "data", "dense", "finetune", "export", "bench")}
    assert all(v >= 0 for v in phases.values())
    assert sum(phases.values()) <= metrics["runtime_s"] + 0.01  # each is rounded to the millisecond
    assert phases["phase_s/dense"] > 0 and phases["phase_s/finetune"] > 0

    # The learning curves, written whatever the logger: one line per logged dict.
    lines = history(tmp_path)
    assert [h["dense/epoch"] for h in lines if "dense/acc" in h] == [1, 2, 3]
    assert [h["finetune/epoch"] for h in lines if "finetune/acc" in h] == [1, 2]
    assert lines[-1]["finetune/acc"] == pytest.approx(metrics["acc_final"], abs=0.05)
    assert all(a["step"] <= b["step"] for a, b in zip(lines, lines[1:]))  # in step order

    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["config"]["trainer"]["epochs"] == 3
    assert manifest["torch"] == torch.__version__ and manifest["seed"] == 0
    assert {"git_sha", "git_dirty", "python", "cuda", "cudnn", "gpu", "kernel_build"} <= manifest.keys()

    with open(tmp_path / "layers.csv") as f:
        rows = list(csv.DictReader(f))
    assert LAYER_COLUMNS <= set(rows[0])
    layers = {r["layer"]: r for r in rows}
    assert list(layers) == ["block1.conv", "block2.conv", "block3.conv", "fc"]
    assert layers["block1.conv"]["in_shape"] == "1x8x8" and layers["fc"]["in_shape"] == "32"  # 128 * 0.25
    # macs_kept: the multiply-adds of the non-zero weights, each used at its layer's output positions.
    assert [int(layers[n]["macs_per_weight"]) for n in layers] == [64, 64, 16, 1]
    kept = sum(int(r["nnz"]) * int(r["macs_per_weight"]) for r in layers.values())
    dense = sum(int(r["params"]) * int(r["macs_per_weight"]) for r in layers.values())
    assert metrics["macs_kept"] == pytest.approx(kept / dense)
    # block2 and block3 at 90% (and a few 8-bit zeros); block1 and fc stay dense: 0.129 of the whole.
    assert dense == 72 * 64 + 1152 * 64 + 4608 * 16 + 320 and 0.12 < metrics["macs_kept"] <= 0.1292
    assert all(float(r["time_us"]) > 0 for r in rows)  # every layer timed on every backend run here
    assert {r["backend"] for r in rows} >= {"torch_cpu"}


@pytest.mark.cuda
@pytest.mark.parametrize("extra", [[], ["trainer.distill=0.5"]])
def test_cuda_graphed_training_prunes_and_quantizes(tmp_path: Path, extra):
    # trainer.compile_mode=reduce-overhead replays forward and backward as CUDA graphs while the
    # hooks change the weights in place between steps: the masks and the grids must still hold.
    # With trainer.distill the dense teacher is compiled and replayed too, in bf16 and channels_last.
    overrides = [
        *TINY,
        "trainer.epochs=3",
        "trainer.finetune_epochs=4",
        "bench=none",
        "trainer.device=cuda",
        "trainer.compile=true",
        "trainer.compile_mode=reduce-overhead",
        "quant.bits=4",
        *extra,
    ]
    metrics = run(compose(*overrides), tmp_path)
    assert metrics["status"] == "ok"
    assert metrics["acc_dense"] > 0.8 and metrics["acc_final"] > metrics["acc_dense"] - 0.1
    assert metrics["sparsity"] == pytest.approx(0.9, abs=1e-3) and metrics["weight_bits"] == 4


@pytest.mark.cuda
def test_cuda_graphed_dense_training_ends_with_the_average(tmp_path: Path):
    # The average is updated from the model's parameters between graph replays.
    overrides = [
        *DENSE,
        "trainer.epochs=3",
        "bench=none",
        "trainer.device=cuda",
        "trainer.compile=true",
        "trainer.compile_mode=reduce-overhead",
        "trainer.ema_decay=0.9",
    ]
    metrics = run(compose(*overrides), tmp_path)
    epochs = [h for h in history(tmp_path) if "dense/acc_ema" in h]
    assert metrics["status"] == "ok" and len(epochs) == 3
    assert metrics["acc_dense"] == pytest.approx(epochs[-1]["dense/acc_ema"], abs=0.01) and metrics["acc_dense"] > 0.8


def history(run_dir: Path) -> list:
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


def test_dense_run_reports_neutral_compression_values(tmp_path: Path):
    metrics = run(compose(*DENSE), tmp_path)
    assert metrics["sparsity"] == 0.0 and metrics["weight_bits"] == 32
    assert metrics["footprint_bytes"] == metrics["dense_bytes"] and metrics["compression"] == 1.0
    assert metrics["macs_kept"] == 1.0
    assert not (tmp_path / "packed.safetensors").exists()
    lines = len(history(tmp_path))
    run(compose(*DENSE), tmp_path)  # a fresh run in the same folder starts a fresh history
    assert len(history(tmp_path)) == lines


@pytest.mark.parametrize("extra", [[], ["trainer.ema_decay=0.9"]], ids=["plain", "ema"])
def test_resume_after_a_crash_reaches_the_same_result(tmp_path: Path, monkeypatch, extra):
    overrides = [*DENSE, "trainer.epochs=2", "trainer.checkpoint_every=7", "trainer.deterministic=true", *extra]
    reference = run(compose(*overrides), tmp_path / "uninterrupted")

    save = sparsebench.checkpoints.save

    def crash_after_step_7(obj, path):
        save(obj, path)
        if obj.get("step") == 7:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(sparsebench.checkpoints, "save", crash_after_step_7)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(compose(*overrides), tmp_path / "resumed")
    assert json.loads((tmp_path / "resumed" / "metrics.json").read_text())["status"] == "failed"
    monkeypatch.setattr(sparsebench.checkpoints, "save", save)

    resumed = run(compose(*overrides, "trainer.resume=true"), tmp_path / "resumed")
    assert resumed["acc_final"] == reference["acc_final"]
    # The resumed run added to the history of the crashed one and ends at the same curve.
    before, after = history(tmp_path / "uninterrupted"), history(tmp_path / "resumed")
    last_acc = lambda lines: [h["dense/acc"] for h in lines if "dense/acc" in h][-1]  # noqa: E731
    assert len(after) >= len(before) and last_acc(after) == last_acc(before)
    a = torch.load(tmp_path / "uninterrupted" / "dense.pt")["model"]
    b = torch.load(tmp_path / "resumed" / "dense.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_epochs_saves_every_nth_epoch_and_the_last(tmp_path: Path, monkeypatch):
    saved = []
    save = sparsebench.checkpoints.save
    monkeypatch.setattr(
        sparsebench.checkpoints,
        "save",
        lambda obj, path: (saved.append(obj["step"]) if "step" in obj else None, save(obj, path)),
    )
    run(compose(*DENSE, "trainer.epochs=5", "trainer.checkpoint_epochs=2"), tmp_path / "a")
    epoch_ends = [h["step"] for h in history(tmp_path / "a") if "dense/epoch" in h]
    assert len(epoch_ends) == 5 and saved == [epoch_ends[1], epoch_ends[3], epoch_ends[4]]
    # checkpoint_every still saves on its own steps where they fall on an epoch's end.
    saved.clear()
    run(
        compose(
            *DENSE, "trainer.epochs=5", "trainer.checkpoint_epochs=5", f"trainer.checkpoint_every={2 * epoch_ends[0]}"
        ),
        tmp_path / "b",
    )
    assert saved == [epoch_ends[1], epoch_ends[3], epoch_ends[4]]


def test_drop_last_and_eval_every_reach_the_training_loop(tmp_path: Path):
    run(
        compose(*DENSE, "trainer.epochs=3", "data.batch_size=100", "data.drop_last=true", "trainer.eval_every=2"),
        tmp_path,
    )
    epoch_ends = [h for h in history(tmp_path) if "dense/epoch" in h]
    # 1437 digits less a tenth held out for validation: 1293, 12 whole batches of 100, not 13.
    assert [h["step"] for h in epoch_ends] == [12, 24, 36]
    assert [h["dense/epoch"] for h in epoch_ends if "dense/acc" in h] == [2, 3]


def test_resume_with_other_batches_an_epoch_is_a_clear_error(tmp_path: Path):
    # The saved step would fall in another epoch, at another batch: refused rather than skipping images.
    # (The CLI refuses the changed config before this; the check guards run() called from Python.)
    run(compose(*DENSE, "trainer.epochs=2", "data.batch_size=100"), tmp_path)
    with pytest.raises(
        ConfigError,
        match=r"trainer.resume=true: the checkpoint's run had 13 batches an epoch, this "
        r"one has 12; resume with the data.batch_size and data.drop_last it ran with",
    ):
        run(
            compose(*DENSE, "trainer.epochs=3", "data.batch_size=100", "data.drop_last=true", "trainer.resume=true"),
            tmp_path,
        )


def test_resuming_a_run_with_another_config_is_a_clear_error(tmp_path: Path):
    # Resuming under another recipe would mix two (say, a pruning ceiling lowered mid-run); the
    # run directory and its files stay as they were.
    run(compose(*DENSE, "trainer.epochs=2"), tmp_path)
    manifest = (tmp_path / "manifest.json").read_text()
    result = run_cli(*DENSE, "trainer.epochs=3", "trainer.resume=true", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        f"error: trainer.resume=true: {tmp_path} ran with trainer.epochs=2, this launch has trainer.epochs=3; "
        "give a new hydra.run.dir to run the changed config"
    ) in result.stderr
    assert (tmp_path / "manifest.json").read_text() == manifest
    # Keys free to change on a relaunch (how often to score, the logger) resume.
    again = run_cli(
        *DENSE, "trainer.epochs=2", "trainer.eval_every=2", "trainer.resume=true", f"hydra.run.dir={tmp_path}"
    )
    assert again.returncode == 0, again.stderr[-2000:]


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path: Path):
    result = run_cli(*DENSE, "trainer.resume=true", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2
    assert "trainer.resume=true: no checkpoint at" in result.stderr and "Traceback" not in result.stderr


def test_init_from_skips_dense_training_and_keeps_the_weights(tmp_path: Path):
    first = run(compose(*DENSE), tmp_path / "dense")
    again = run(compose(*DENSE, f"trainer.init_from={tmp_path / 'dense' / 'dense.pt'}"), tmp_path / "shared")
    assert again["acc_dense"] == first["acc_final"]
    assert not (tmp_path / "shared" / "checkpoints").exists()


def test_init_from_a_mismatched_model_is_a_clear_error(tmp_path: Path):
    run(compose(*DENSE), tmp_path / "dense")
    result = run_cli(
        *DENSE,
        "model.width=0.5",
        f"trainer.init_from={tmp_path / 'dense' / 'dense.pt'}",
        f"hydra.run.dir={tmp_path / 'other'}",
    )
    assert result.returncode == 2
    assert "trainer.init_from=" in result.stderr and "do not fit model=convnet" in result.stderr


def test_wandb_offline_writes_run_files_without_network(tmp_path: Path, monkeypatch):
    # An unroutable server: any attempt to reach W&B would fail the run.
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    result = run_cli(*[o for o in DENSE if not o.startswith("logger")], "logger=wandb", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    records = list(runs[0].glob("run-*.wandb"))
    assert records, "no offline W&B log file"
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "ok"
    # The dense weights went along as a model artifact, under the experiment's name; grouped by it too.
    logged = records[0].read_bytes()
    assert b"default-dense" in logged and b"dense.pt" in logged and b"default" in logged


def test_weight_bits_of_a_mixed_precision_run_is_the_nnz_weighted_mean(tmp_path: Path):
    metrics = run(
        compose(*TINY, "trainer.finetune_epochs=4", "bench=none", "quant.bits=4", "++quant.overrides={fc:8}"), tmp_path
    )
    with open(tmp_path / "layers.csv") as f:
        rows = {r["layer"]: r for r in csv.DictReader(f)}
    assert {r["bits"] for r in rows.values()} == {"4", "8"}
    nnz = {name: int(r["nnz"]) for name, r in rows.items()}
    expected = (8 * nnz["fc"] + 4 * (sum(nnz.values()) - nnz["fc"])) / sum(nnz.values())
    assert metrics["weight_bits"] == pytest.approx(expected, abs=1e-3) and 4 < metrics["weight_bits"] < 8


@pytest.mark.parametrize(
    "quant",
    [["quant=kmeans"], ["quant=kmeans", "quant.kmeans_per_channel=true"], ["quant=linear"]],
    ids=["kmeans", "kmeans-per-channel", "linear"],
)
def test_the_exported_model_is_the_one_evaluated_at_the_last_epoch(tmp_path: Path, quant: list):
    metrics = run(
        compose(
            *TINY, "trainer.finetune_epochs=3", "prune.unit=epoch", "prune.end=2", "bench=none", *quant, "quant.bits=3"
        ),
        tmp_path,
    )
    last_epoch = [h for h in history(tmp_path) if "finetune/acc" in h][-1]
    assert metrics["acc_val_final"] == last_epoch["finetune/acc"]  # the loop scores the validation split


def test_the_validation_split_is_scored_every_epoch_and_the_test_set_at_each_phase_end(tmp_path: Path):
    metrics = run(compose(*TINY, "trainer.finetune_epochs=2", "bench=none", "data.val_fraction=0.2"), tmp_path)
    assert metrics["val_size"] == 287  # a fifth of each class of the 1437 training digits
    scores = history(tmp_path)
    assert [h["dense/acc"] for h in scores if "dense/acc" in h][-1] == metrics["acc_val_dense"]
    assert [h["finetune/acc"] for h in scores if "finetune/acc" in h][-1] == metrics["acc_val_final"]
    ends = next(h for h in scores if "acc_dense" in h)  # logged when dense training ends, both splits
    assert ends["acc_dense"] == metrics["acc_dense"] and ends["acc_val_dense"] == metrics["acc_val_dense"]
    assert metrics["acc_dense"] != metrics["acc_val_dense"] or metrics["acc_final"] != metrics["acc_val_final"]
    unsplit = run(compose(*TINY, "trainer.finetune_epochs=2", "bench=none", "data.val_fraction=0"), tmp_path / "all")
    assert "acc_val_final" not in unsplit and unsplit["val_size"] == 0


def test_per_channel_kmeans_runs_end_to_end(tmp_path: Path):
    # Pruned to 90%, channels of block2 keep fewer weights than their 15 levels. The packed network, each
    # row decoded through its own codebook, must compute what the trained model computes.
    metrics = run(
        compose(
            *TINY,
            "trainer.finetune_epochs=4",
            "prune.unit=epoch",
            "prune.end=2",
            "bench=quick",
            "quant=kmeans",
            "quant.kmeans_per_channel=true",
        ),
        tmp_path,
    )
    assert metrics["status"] == "ok" and metrics["weight_bits"] == 4
    assert metrics["acc_final"] > metrics["acc_dense"] - 0.1
    assert metrics["network_export_error/b1"] < 1e-5
    layers, _ = load_packed(tmp_path / "packed.safetensors")
    assert int(layers["block2.conv"].row_nnz().min()) < 15
    with open(tmp_path / "layers.csv") as f:
        rows = {r["layer"]: r for r in csv.DictReader(f)}
    for name, layer in layers.items():  # a 16-level fp32 codebook per output channel, counted in the footprint
        assert layer.codebook.shape == (layer.out_channels, 16)
        assert int(rows[name]["grid_bytes"]) == layer.out_channels * 16 * 4
        assert int(rows[name]["footprint_bytes"]) == layer.footprint_bytes()


@pytest.mark.cuda
def test_per_channel_kmeans_runs_on_the_kernels(tmp_path: Path):
    # The exported per-channel codebooks through our kernels: the benchmark checks every layer and the whole
    # network against an fp64 reference before it times them (a mismatch stops the run).
    metrics = run(
        compose(
            *TINY,
            "trainer.finetune_epochs=4",
            "prune.unit=epoch",
            "prune.end=2",
            "bench=quick",
            "trainer.device=cuda",
            "quant=kmeans",
            "quant.kmeans_per_channel=true",
        ),
        tmp_path,
    )
    assert metrics["status"] == "ok" and metrics["bench/backend"] == "direct_sparse"
    assert metrics["network_error/direct_sparse/b1"] < 1e-3


def test_version_and_help_describe_the_tool():
    version = run_cli("--version", fresh=True)
    assert version.returncode == 0 and version.stdout.startswith("sparsebench ")
    helped = run_cli("--help", fresh=True)
    assert helped.returncode == 0 and "sparsebench: train a CNN" in helped.stdout and "debug: quick" in helped.stdout
    assert "powered by Hydra" not in helped.stdout
