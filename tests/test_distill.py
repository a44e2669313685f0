"""Retraining that distils the dense model (trainer.distill): the loss, and a tiny run."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsebench.config import validate
from sparsebench.distill import Distillation
from sparsebench.errors import ConfigError
from sparsebench.experiment import run
from tests.conftest import TINY, compose


def test_the_loss_mixes_labels_and_the_teachers_softened_outputs():
    torch.manual_seed(0)
    teacher = nn.Linear(6, 4)
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    logits = torch.randn(8, 4, requires_grad=True)
    task = nn.CrossEntropyLoss()
    loss = Distillation(teacher, 0.7, 2.0, task)(logits, y, x)
    p = F.softmax(teacher(x).detach() / 2, dim=1)  # by hand: KL(p || q) per sample, averaged, times T^2
    kl = (p * (p.log() - F.log_softmax(logits / 2, dim=1))).sum(1).mean()
    torch.testing.assert_close(loss, 0.3 * task(logits, y) + 0.7 * 4 * kl)
    assert not teacher.training and not any(q.requires_grad for q in teacher.parameters())
    loss.backward()  # the gradient reaches the student's logits only
    assert logits.grad is not None and teacher.weight.grad is None
    # Weight 0 is the task loss; a student equal to its teacher has no soft loss at any temperature.
    assert Distillation(nn.Linear(6, 4), 0.0, 4.0, task)(logits, y, x).item() == pytest.approx(task(logits, y).item())
    same = Distillation(teacher, 1.0, 4.0, task)(teacher(x).detach(), y, x)
    assert same.item() == pytest.approx(0.0, abs=1e-6)


BASE = [
    *TINY,
    "prune=agp",
    "quant=none",
    "bench=none",
    "trainer.finetune_epochs=2",
    "prune.unit=epoch",
    "prune.end=1",
    "trainer.deterministic=true",
    "trainer.device=cpu",
]


@pytest.fixture
def teachers(monkeypatch):
    """The state dict of every teacher a run distils, in order."""
    import sparsebench.experiment

    seen = []

    class Recorded(Distillation):
        def __init__(self, teacher, *args, **kw):
            seen.append({k: v.clone() for k, v in teacher.state_dict().items()})
            super().__init__(teacher, *args, **kw)

    monkeypatch.setattr(sparsebench.experiment, "Distillation", Recorded)
    return seen


def test_the_teacher_is_the_dense_model_of_the_run_or_of_init_from(tmp_path, teachers):
    run(compose(*BASE, "trainer.distill=0.5"), tmp_path / "own")
    other = run(compose(*BASE, "seed=1"), tmp_path / "other")  # another dense model, to start from
    run(
        compose(*BASE, "trainer.distill=0.5", f"trainer.init_from={tmp_path / 'other' / 'dense.pt'}"), tmp_path / "from"
    )
    assert other["acc_dense"] > 0 and len(teachers) == 2
    for teacher, dense in zip(teachers, ("own", "other")):
        saved = torch.load(tmp_path / dense / "dense.pt", weights_only=False)["model"]
        assert teacher.keys() == saved.keys() and all(torch.equal(teacher[k], saved[k]) for k in saved)
    assert not all(torch.equal(teachers[0][k], teachers[1][k]) for k in saved)


def test_the_teacher_may_be_another_networks_dense_model(tmp_path, teachers):
    dense_only = [*TINY, "prune=none", "quant=none", "bench=none", "trainer.deterministic=true", "trainer.device=cpu"]
    teacher = run(compose(*dense_only, "model.width=0.5"), tmp_path / "wide")  # a wider network on the same data
    wide = torch.load(tmp_path / "wide" / "dense.pt", weights_only=False)["model"]
    student = run(
        compose(*BASE, "trainer.distill=0.5", f"trainer.teacher={tmp_path / 'wide' / 'dense.pt'}"), tmp_path / "student"
    )
    own = torch.load(tmp_path / "student" / "dense.pt", weights_only=False)["model"]
    assert student["status"] == "ok" and len(teachers) == 1
    assert student["acc_teacher"] == teacher["acc_dense"] != student["acc_dense"]
    assert teachers[0].keys() == wide.keys() and all(torch.equal(teachers[0][k], wide[k]) for k in wide)
    assert any(wide[k].shape != own[k].shape for k in own)  # not the student's own shape


def test_a_teacher_that_cannot_teach_is_named_before_training(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"trainer\.teacher='t\.pt' is not allowed: null, or a run's dense\.pt "
        r"when trainer\.distill > 0",
    ):
        validate(compose(*TINY, "prune=agp", "trainer.teacher=t.pt"))
    with pytest.raises(ConfigError, match=r"trainer\.teacher='' is not allowed"):
        validate(compose(*TINY, "prune=agp", "trainer.distill=0.5", "trainer.teacher=''"))
    validate(compose(*TINY, "prune=agp", "trainer.epochs=0", "trainer.distill=0.5", "trainer.teacher=t.pt"))
    torch.save({"model": {}, "model_cfg": {"name": "convnet", "width": 0.25}, "data": "cifar10"}, tmp_path / "cifar.pt")
    torch.save(
        {"model": {"fc.weight": torch.zeros(1)}, "model_cfg": {"name": "convnet", "width": 0.5}, "data": "digits"},
        tmp_path / "odd.pt",
    )
    for teacher, problem in (
        ("missing.pt", "no such file \\(give the dense.pt of a run on data=digits\\)"),
        ("cifar.pt", "not the dense.pt of a run on data=digits \\(found .*data 'cifar10'"),
        ("odd.pt", "its weights do not fit the model it names"),
    ):
        with pytest.raises(ConfigError, match=rf"trainer\.teacher='.*{teacher}': {problem}"):
            run(compose(*BASE, "trainer.distill=0.5", f"trainer.teacher={tmp_path / teacher}"), tmp_path / "run")
        assert not (tmp_path / "run" / "dense.pt").exists()  # nothing trained


def test_a_missing_init_from_file_is_named_as_the_teachers_is(tmp_path):
    for target in (tmp_path / "missing.pt", tmp_path):  # a folder is no weights file either
        with pytest.raises(
            ConfigError,
            match=r"trainer\.init_from='.*': no such file \(give a dense\.pt or "
            r"checkpoints/last\.pt of a run\)",
        ):
            run(compose(*BASE, f"trainer.init_from={target}"), tmp_path / "run")


def test_a_pruned_run_distils_its_dense_model(tmp_path):
    plain = run(compose(*BASE), tmp_path / "plain")
    distilled = run(compose(*BASE, "trainer.distill=0.9"), tmp_path / "distilled")
    assert distilled["acc_dense"] == plain["acc_dense"]  # the same dense model ...
    assert distilled["sparsity"] == pytest.approx(plain["sparsity"])

    def losses(run_dir):
        rows = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
        return [r["finetune/loss"] for r in rows if "finetune/loss" in r]

    assert losses(tmp_path / "distilled") != pytest.approx(losses(tmp_path / "plain"))  # ... retrained on another loss
    assert distilled["acc_final"] > 0.5


def test_a_dense_only_run_leaves_distillation_unused(tmp_path):
    # A study's config may set trainer.distill; its dense-only run (prune=none quant=none) trains as without it.
    dense = [*BASE, "prune=none", "trainer.finetune_epochs=0"]
    plain = run(compose(*dense), tmp_path / "plain")
    with_distill = run(compose(*dense, "trainer.distill=0.5"), tmp_path / "distill")
    assert with_distill["status"] == "ok" and with_distill["acc_final"] == plain["acc_final"]
    assert not any(
        "finetune/loss" in line for line in (tmp_path / "distill" / "history.jsonl").read_text().splitlines()
    )


def test_distilling_needs_a_dense_model(tmp_path):
    with pytest.raises(ConfigError, match=r"trainer\.distill=0\.5 is not allowed: 0 unless there is a dense model"):
        validate(compose(*TINY, "prune=agp", "trainer.epochs=0", "trainer.distill=0.5"))
    with pytest.raises(ConfigError, match=r"trainer\.distill=1\.5 is not allowed"):
        validate(compose(*TINY, "trainer.distill=1.5"))
    validate(compose(*TINY, "prune=agp", "trainer.epochs=0", "trainer.init_from=dense.pt", "trainer.distill=0.5"))
    validate(compose(*TINY, "prune=none", "quant=none", "trainer.epochs=0", "trainer.distill=0.5"))  # nothing retrains
    # Resumed with distillation but without the dense model it would learn from: named, before training.
    run(compose(*BASE), tmp_path / "run")
    (tmp_path / "run" / "dense.pt").unlink()
    with pytest.raises(ConfigError, match=r"trainer\.distill=0\.5: no dense model to learn from at .*dense\.pt"):
        run(compose(*BASE, "trainer.distill=0.5", "trainer.resume=true"), tmp_path / "run")
