"""SIGTERM during training (a scheduler's time limit, `timeout`): the loop saves where it is and stops,
and a resumed run ends as an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from sparsebench.errors import StopRequested
from sparsebench.prune.pruner import MagnitudePruner
from sparsebench.quant import build_quantizer
from sparsebench.quant.config import QuantConfig
from sparsebench.train import TrainHook, fit
from tests.conftest import DENSE, ROOT
from tests.test_prune import _digits_batches, convnet, prune_cfg

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

CFG = SimpleNamespace(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4, scheduler="cosine",
                      label_smoothing=0.0, amp=False, compile=False, compile_mode="default", progress=False,
                      checkpoint_every=0, checkpoint_epochs=10)


class SigtermAt(TrainHook):
    """Sends this process SIGTERM after the optimizer step ``at``, as a time limit would."""

    def __init__(self, at: int) -> None:
        self.at = at

    def after_step(self, step: int, model: torch.nn.Module) -> None:
        if step == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


def compressing_fit(checkpoint: Path, stop_at: int = -1, resume: bool = False) -> torch.nn.Module:
    """Two epochs of pruning (masks cut mid-epoch) and 3-bit k-means QAT (codebooks refitted at each
    epoch's end) on digits: a stop that skipped an epoch's end would change the result."""
    train, test = _digits_batches()
    model = convnet()
    hooks = [MagnitudePruner(prune_cfg(start=0, end=1.5, frequency=0.25), model),
             build_quantizer(OmegaConf.structured(QuantConfig(method="kmeans", bits=3)), model), SigtermAt(stop_at)]
    fit(model, train, test, CFG, phase="finetune", epochs=2, lr=CFG.lr, hooks=hooks, checkpoint=checkpoint,
        resume_from=torch.load(checkpoint, weights_only=False) if resume else None)
    return model


@pytest.mark.parametrize("where", ["mid-epoch", "epoch-end"])
def test_sigterm_saves_the_step_and_the_resumed_fit_ends_as_an_uninterrupted_one(tmp_path: Path, where: str) -> None:
    steps_per_epoch = len(_digits_batches()[0])
    stop_at = 7 if where == "mid-epoch" else steps_per_epoch
    reference = compressing_fit(tmp_path / "reference.pt").state_dict()
    before = signal.getsignal(signal.SIGTERM)

    with pytest.raises(StopRequested, match=f"SIGTERM during finetune training: saved step {stop_at} of "
                                            f"{2 * steps_per_epoch} to .*stopped.pt; trainer.resume=true continues"):
        compressing_fit(tmp_path / "stopped.pt", stop_at=stop_at)
    assert signal.getsignal(signal.SIGTERM) is before  # outside training, SIGTERM is as it was
    assert torch.load(tmp_path / "stopped.pt", weights_only=False)["step"] == stop_at

    resumed = compressing_fit(tmp_path / "stopped.pt", resume=True).state_dict()
    assert resumed.keys() == reference.keys() and all(torch.equal(resumed[k], reference[k]) for k in reference)


def test_sigterm_stops_the_cli_with_a_checkpoint_and_the_resumed_run_redoes_nothing(tmp_path: Path) -> None:
    args = [sys.executable, "-m", "sparsebench", *DENSE, "trainer.epochs=30", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    history = tmp_path / "history.jsonl"
    deadline = time.time() + 120
    while not (history.exists() and "dense/epoch" in history.read_text()) and time.time() < deadline:
        time.sleep(0.1)  # until it trains
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("stopped: SIGTERM during dense training: saved step ")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    saved = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)["step"]
    assert metrics["status"] == "failed"
    assert metrics["error"].startswith(f"StopRequested: SIGTERM during dense training: saved step {saved} of ")

    done = subprocess.run([*args, "trainer.resume=true"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "ok"
    # Every epoch logged once over both runs: the resumed one went on from the step the stop saved.
    epochs = [json.loads(line)["dense/epoch"] for line in history.read_text().splitlines() if "dense/epoch" in line]
    assert epochs == list(range(1, 31))


def test_sigterm_stops_a_sweep_before_its_next_job_and_the_resumed_sweep_finishes_both(tmp_path: Path) -> None:
    args = [sys.executable, "-m", "sparsebench", "-m", *DENSE, "trainer.epochs=30", "seed=0,1",
            f"hydra.sweep.dir={tmp_path}", "hydra.sweep.subdir=job${hydra.job.num}"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    history = tmp_path / "job0" / "history.jsonl"
    deadline = time.time() + 120
    while not (history.exists() and "dense/epoch" in history.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert not (tmp_path / "job1").exists()  # the second job never started

    done = subprocess.run([*args, "trainer.resume=true"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    for job in ("job0", "job1"):
        lines = (tmp_path / job / "history.jsonl").read_text().splitlines()
        assert [json.loads(line)["dense/epoch"] for line in lines if "dense/epoch" in line] == list(range(1, 31))
