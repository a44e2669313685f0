"""Pruning end to end through ``experiment.run`` (in-process, tiny digits runs): per-layer
targets in layers.csv, global scope, every schedule, resume, init_from, sensitivity."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Dict, List

import pytest
import torch
import yaml

from sparsebench.experiment import run
from sparsebench.prune import MagnitudePruner
from sparsebench.prune.masks import prune_count
from sparsebench.prune.sensitivity import safe_sparsity
from tests.conftest import TINY, compose

# Pruning alone (whatever the default experiment adds), on tiny runs.
BASE = [*TINY, "prune=none", "quant=none", "bench=none"]
# One dense epoch, then 2 finetune epochs with the schedule done after the first.
AGP = ["prune=agp", "trainer.finetune_epochs=2", "prune.unit=epoch", "prune.end=1", "prune.frequency=0.5"]


def run_exp(run_dir: Path, *overrides: str) -> dict:
    return run(compose(*BASE, *overrides), run_dir)


def history(run_dir: Path) -> List[dict]:
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


def layer_rows(run_dir: Path) -> Dict[str, dict]:
    with open(run_dir / "layers.csv") as f:
        return {r["layer"]: r for r in csv.DictReader(f)}


def zeros(row: dict) -> int:
    return int(row["params"]) - int(row["nnz"])


def test_agp_every_layer_ends_on_its_target_first_and_last_stay_dense(tmp_path):
    metrics = run_exp(tmp_path, *AGP, r"++prune.overrides={block3\.conv:0.6}")
    rows = layer_rows(tmp_path)
    assert float(rows["block1.conv"]["sparsity"]) == 0.0 and float(rows["fc"]["sparsity"]) == 0.0
    for name, target in {"block2.conv": 0.9, "block3.conv": 0.6}.items():
        n = int(rows[name]["params"])
        assert zeros(rows[name]) == prune_count(n, target)  # exact rounding ...
        assert abs(zeros(rows[name]) / n - target) <= 0.001  # ... so within 0.1 pp (layers of >= 500 weights)
    prunable = [rows["block2.conv"], rows["block3.conv"]]
    assert metrics["sparsity"] == pytest.approx(sum(map(zeros, prunable)) / sum(int(r["params"]) for r in prunable))
    # The masks in the last checkpoint are exactly the zeros of the final weights.
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)
    masks = ckpt["hooks"]["prune"]["masks"]
    assert set(masks) == {"block2.conv", "block3.conv"}
    for name, mask in masks.items():
        assert torch.equal(ckpt["model"][f"{name}.weight"] == 0, ~mask)
    assert metrics["acc_final"] > 0.5  # it still classifies after retraining


def test_global_scope_pools_the_layers(tmp_path):
    metrics = run_exp(tmp_path, *AGP, "prune.scope=global", "prune.final_sparsity=0.8", "trainer.epochs=0")
    rows = layer_rows(tmp_path)
    b2, b3 = rows["block2.conv"], rows["block3.conv"]
    total = int(b2["params"]) + int(b3["params"])
    assert zeros(b2) + zeros(b3) == prune_count(total, 0.8)
    assert metrics["sparsity"] == pytest.approx(prune_count(total, 0.8) / total)
    assert abs(float(b2["sparsity"]) - float(b3["sparsity"])) > 0.005  # one threshold, unequal layers


def test_macs_exponent_takes_more_of_the_early_layers_compute(tmp_path):
    # block2.conv runs at 8x8, block3.conv at 4x4: weighing by multiply-adds moves zeros into block2.
    args = [*AGP, "prune.scope=global", "prune.final_sparsity=0.8", "trainer.epochs=0"]
    plain = run_exp(tmp_path / "plain", *args)
    weighed = run_exp(tmp_path / "weighed", *args, "prune.macs_exponent=0.5")
    a, b = layer_rows(tmp_path / "plain"), layer_rows(tmp_path / "weighed")
    assert zeros(a["block2.conv"]) + zeros(a["block3.conv"]) == zeros(b["block2.conv"]) + zeros(b["block3.conv"])
    assert zeros(b["block2.conv"]) > zeros(a["block2.conv"]) + 50
    assert weighed["sparsity"] == plain["sparsity"] and weighed["macs_kept"] < plain["macs_kept"] - 0.02


@pytest.mark.parametrize(
    "method, extra",
    [
        ("iterative", ["prune.rounds=3", "prune.start=0", "prune.unit=epoch", "prune.end=1"]),
        ("oneshot", ["prune.start=0.5"]),
        (
            "agp",
            ["prune.unit=epoch", "prune.end=1", "prune.frequency=0.25", "prune.regrow_until=1.75"],
        ),  # masks regrow until 1.75
    ],
)
def test_every_schedule_reaches_the_target(tmp_path, method, extra):
    # No dense epochs: the counts do not depend on how well the model was trained.
    run_exp(
        tmp_path,
        f"prune={method}",
        "trainer.epochs=0",
        "trainer.finetune_epochs=2",
        "prune.final_sparsity=0.75",
        *extra,
    )
    rows = layer_rows(tmp_path)
    for name in ("block2.conv", "block3.conv"):
        assert zeros(rows[name]) == prune_count(int(rows[name]["params"]), 0.75)
    if "prune.regrow_until=1.75" in extra:  # and on the way, weights grew back
        assert sum(m.get("sparsity/regrown", 0) for m in history(tmp_path)) > 0


# With regrowing masks (until step 81, across the cut at 57), with the dense model as a teacher
# (reloaded from the run's dense.pt on resume), and with one threshold weighed by multiply-adds.
@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["prune.regrow_until=1.8"],
        ["trainer.distill=0.5"],
        ["prune.scope=global", "prune.macs_exponent=0.5", "prune.max_layer_sparsity=0.95"],
    ],
)
def test_resume_mid_finetune_ends_like_an_uninterrupted_run(tmp_path, monkeypatch, extra):
    args = [
        "prune=agp",
        "trainer.finetune_epochs=2",
        "prune.unit=epoch",
        "prune.end=1.5",
        "prune.frequency=0.2",
        "data.val_fraction=0",  # 45 steps an epoch: the step numbers above
        "trainer.checkpoint_every=10",
        "trainer.deterministic=true",
        "trainer.device=cpu",
        *extra,
    ]
    full = run_exp(tmp_path / "full", *args)

    cut_dir = tmp_path / "cut"
    after_step = MagnitudePruner.after_step

    def killed_at_57(self, step, model):  # 45 steps an epoch: in finetune epoch 2, last checkpoint at 50
        after_step(self, step, model)
        if step == 57:
            raise KeyboardInterrupt

    monkeypatch.setattr(MagnitudePruner, "after_step", killed_at_57)
    with pytest.raises(KeyboardInterrupt):
        run_exp(cut_dir, *args)
    monkeypatch.undo()
    ckpt = torch.load(cut_dir / "checkpoints" / "last.pt", weights_only=False)
    assert (ckpt["phase"], ckpt["step"], ckpt["hooks"]["prune"]["step"]) == ("finetune", 50, 50)
    assert 0 < ckpt["hooks"]["prune"]["progress"] < 1  # interrupted in the middle of the schedule

    resumed = run_exp(cut_dir, *args, "trainer.resume=true")
    regrown = [m["sparsity/regrown"] for m in history(tmp_path / "full") if "sparsity/regrown" in m]
    regrow = "prune.regrow_until=1.8" in extra
    assert (len(regrown), sum(regrown) > 0) == ((2, True) if regrow else (0, False))
    for key in ("acc_dense", "acc_final", "sparsity"):
        assert resumed[key] == full[key], key
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(cut_dir / "checkpoints" / "last.pt", weights_only=False)
    assert a["step"] == b["step"] == 2 * 45
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["hooks"]["prune"]["masks"][n], m) for n, m in b["hooks"]["prune"]["masks"].items())


def test_prune_from_a_shared_dense_model(tmp_path):
    dense = run_exp(tmp_path / "dense")
    pruned = run_exp(tmp_path / "pruned", *AGP, f"trainer.init_from={tmp_path / 'dense' / 'dense.pt'}")
    assert pruned["acc_dense"] == dense["acc_dense"]  # evaluated on the very same weights
    assert not (tmp_path / "pruned" / "dense.pt").exists()  # no dense training of its own
    assert zeros(layer_rows(tmp_path / "pruned")["block2.conv"]) == prune_count(1152, 0.9)


def test_sensitivity_study_files_and_the_derived_overrides(tmp_path):
    levels = [0.5, 0.9, 0.99]
    metrics = run_exp(tmp_path / "sens", "experiment=sensitivity", f"prune.sensitivity=[{','.join(map(str, levels))}]")
    sens = tmp_path / "sens"
    assert metrics["acc_final"] == metrics["acc_dense"]  # every trial restored the weights
    with open(sens / "sensitivity.csv") as f:
        rows: List[dict] = list(csv.DictReader(f))
    assert [r["layer"] for r in rows] == ["block1.conv", "block2.conv", "block3.conv", "fc"]  # every layer studied
    table = {r["layer"]: {lv: float(r[f"{lv:g}"]) for lv in levels} for r in rows}
    assert all(0 <= acc <= 1 for accs in table.values() for acc in accs.values())
    assert min(accs[0.99] for accs in table.values()) < metrics["acc_dense"] - 0.05  # 99% of one layer hurts

    # Recompute one cell by hand from dense.pt: the same number.
    from sparsebench.data import hold_out, load_dataset
    from sparsebench.experiment import make_batches
    from sparsebench.models import build_model
    from sparsebench.prune.masks import magnitude_mask
    from sparsebench.train import evaluate

    cfg = compose(*TINY)
    data = hold_out(load_dataset(cfg.data), cfg.data.val_fraction)  # the study reads the validation split
    model = build_model("convnet", in_channels=1, num_classes=10, image_size=8, width=0.25)
    model.load_state_dict(torch.load(sens / "dense.pt", weights_only=False)["model"])
    with torch.no_grad():
        w = model.block3.conv.weight
        w.masked_fill_(~magnitude_mask(w, 0.9), 0.0)
    _, val, _ = make_batches(data, cfg, torch.device("cpu"), False)
    assert evaluate(model, val) == table["block3.conv"][0.9]

    assert (sens / "sensitivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    overrides = yaml.safe_load((sens / "sensitivity_overrides.yaml").read_text())["overrides"]
    assert overrides == {n: safe_sparsity(accs, metrics["acc_val_dense"], 0.01) for n, accs in table.items()}
    assert all(v in [0.0, *levels] for v in overrides.values())

    # The file feeds a pruning run: each prunable layer ends at its derived sparsity.
    run_exp(
        tmp_path / "apply",
        *AGP,
        f"prune.overrides_file={sens / 'sensitivity_overrides.yaml'}",
        f"trainer.init_from={sens / 'dense.pt'}",
    )
    applied = layer_rows(tmp_path / "apply")
    for name in ("block2.conv", "block3.conv"):
        assert zeros(applied[name]) == prune_count(int(applied[name]["params"]), overrides[name])
    assert float(applied["block1.conv"]["sparsity"]) == 0.0  # kept dense here although the study covered it
