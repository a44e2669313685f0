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
from tests import cli_process
from tests.conftest import DENSE, ROOT, cli_env, run_cli
from tests.test_prune import _digits_batches, convnet, prune_cfg

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

CFG = SimpleNamespace(
    optimizer="sgd",
    lr=0.05,
    momentum=0.9,
    weight_decay=5e-4,
    scheduler="cosine",
    label_smoothing=0.0,
    amp=False,
    compile=False,
    compile_mode="default",
    progress=False,
    checkpoint_every=0,
    checkpoint_epochs=10,
    eval_every=1,
)


class SigtermAt(TrainHook):
    """Sends this process SIGTERM after the optimizer step ``at``, as a time limit would (and then
    fails, with ``fail``)."""

    def __init__(self, at: int, fail: bool = False) -> None:
        self.at, self.fail = at, fail

    def after_step(self, step: int, model: torch.nn.Module) -> None:
        if step == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
            if self.fail:
                raise RuntimeError("a compile worker died")


class SigtermReachedTheTest(Exception):
    pass


@pytest.fixture(autouse=True)
def sigterm_guard():
    """Outside fit, a SIGTERM to this process fails the test instead of ending pytest."""

    def guard(signum, frame):
        raise SigtermReachedTheTest("SIGTERM was not taken by the training loop")

    previous = signal.signal(signal.SIGTERM, guard)
    yield guard
    signal.signal(signal.SIGTERM, previous)


def compressing_fit(checkpoint: Path, stop_at: int = -1, resume: bool = False, fail_after_stop: bool = False):
    """Two epochs of pruning (masks cut mid-epoch) and 3-bit k-means QAT (codebooks refitted at each
    epoch's end) on digits: a stop that skipped an epoch's end would change the result. Returns the
    model's state and what fit returned."""
    train, test = _digits_batches()
    model = convnet()
    hooks = [
        MagnitudePruner(prune_cfg(start=0, end=1.5, frequency=0.25), model),
        build_quantizer(OmegaConf.structured(QuantConfig(method="kmeans", bits=3)), model),
        SigtermAt(stop_at, fail_after_stop),
    ]
    metrics = fit(
        model,
        train,
        test,
        CFG,
        phase="finetune",
        epochs=2,
        lr=CFG.lr,
        hooks=hooks,
        checkpoint=checkpoint,
        resume_from=torch.load(checkpoint, weights_only=False) if resume else None,
    )
    return model.state_dict(), {k: v for k, v in metrics.items() if not k.endswith(("_s", "_ms"))}  # not timings


@pytest.mark.parametrize("where", ["mid-epoch", "epoch-end", "last-step"])
def test_sigterm_saves_the_step_and_the_resumed_fit_ends_as_an_uninterrupted_one(
    tmp_path: Path, where: str, sigterm_guard
) -> None:
    steps_per_epoch = len(_digits_batches()[0])
    stop_at = {"mid-epoch": 7, "epoch-end": steps_per_epoch, "last-step": 2 * steps_per_epoch}[where]
    reference, reference_metrics = compressing_fit(tmp_path / "reference.pt")

    with pytest.raises(
        StopRequested,
        match=f"SIGTERM during finetune training: saved step {stop_at} of "
        f"{2 * steps_per_epoch} to .*stopped.pt; trainer.resume=true continues",
    ):
        compressing_fit(tmp_path / "stopped.pt", stop_at=stop_at)
    assert signal.getsignal(signal.SIGTERM) is sigterm_guard  # outside training, SIGTERM is as it was
    assert torch.load(tmp_path / "stopped.pt", weights_only=False)["step"] == stop_at

    resumed, metrics = compressing_fit(tmp_path / "stopped.pt", resume=True)
    assert resumed.keys() == reference.keys() and all(torch.equal(resumed[k], reference[k]) for k in reference)
    assert metrics == reference_metrics and metrics["finetune/epoch"] == 2  # even when nothing was left to train


def test_a_failure_after_sigterm_is_a_stop_from_the_last_checkpoint(tmp_path: Path) -> None:
    # As when torch.compile's worker processes die of the same SIGTERM, sent to the process group.
    with pytest.raises(
        StopRequested,
        match="SIGTERM during finetune training, which then failed before it could "
        "save [(]RuntimeError: a compile worker died[)]",
    ) as stopped:
        compressing_fit(tmp_path / "stopped.pt", stop_at=7, fail_after_stop=True)
    assert isinstance(stopped.value.__cause__, RuntimeError)
    assert not (tmp_path / "stopped.pt").exists()  # nothing saved at step 7 (no checkpoint was due yet)


def test_sigterm_stops_the_cli_with_a_checkpoint_and_the_resumed_run_redoes_nothing(tmp_path: Path) -> None:
    args = [*DENSE, "trainer.epochs=20", f"hydra.run.dir={tmp_path}"]
    proc = cli_process.start("sparsebench", args, ROOT, cli_env())
    history = tmp_path / "history.jsonl"
    deadline = time.time() + 120
    while not (history.exists() and "dense/epoch" in history.read_text()) and time.time() < deadline:
        time.sleep(0.1)  # until it trains
    os.kill(proc.pid, signal.SIGTERM)
    stopped = proc.wait(timeout=60)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-2000:]
    assert stopped.stderr.strip().splitlines()[-1].startswith("stopped: SIGTERM during dense training: saved step ")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    saved = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)["step"]
    assert metrics["status"] == "failed"
    assert metrics["error"].startswith(f"StopRequested: SIGTERM during dense training: saved step {saved} of ")

    done = run_cli(*args, "trainer.resume=true")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "ok"
    # Every epoch logged once over both runs: the resumed one went on from the step the stop saved.
    epochs = [json.loads(line)["dense/epoch"] for line in history.read_text().splitlines() if "dense/epoch" in line]
    assert epochs == list(range(1, 21))


def test_sigterm_stops_a_sweep_before_its_next_job_and_the_resumed_sweep_finishes_both(tmp_path: Path) -> None:
    args = [
        "-m",
        *DENSE,
        "trainer.epochs=20",
        "seed=0,1",
        f"hydra.sweep.dir={tmp_path}",
        "hydra.sweep.subdir=job${hydra.job.num}",
    ]
    proc = cli_process.start("sparsebench", args, ROOT, cli_env())
    history = tmp_path / "job0" / "history.jsonl"
    deadline = time.time() + 120
    while not (history.exists() and "dense/epoch" in history.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGTERM)
    stopped = proc.wait(timeout=60)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-2000:]
    assert not (tmp_path / "job1").exists()  # the second job never started

    done = run_cli(*args, "trainer.resume=true")
    assert done.returncode == 0, done.stderr[-2000:]
    for job in ("job0", "job1"):
        lines = (tmp_path / job / "history.jsonl").read_text().splitlines()
        assert [json.loads(line)["dense/epoch"] for line in lines if "dense/epoch" in line] == list(range(1, 21))


def test_sigterm_to_a_parallel_sweep_leaves_no_worker_behind(tmp_path: Path) -> None:
    # Schedulers signal the whole process group: the joblib workers save, stop and exit.
    args = [
        sys.executable,
        "-m",
        "sparsebench",
        "-m",
        *DENSE,
        "trainer.epochs=20",
        "seed=0,1",
        "hydra/launcher=parallel",
        "hydra.launcher.n_jobs=2",
        f"hydra.sweep.dir={tmp_path}",
        "hydra.sweep.subdir=job${hydra.job.num}",
    ]
    proc = subprocess.Popen(
        args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    histories = [tmp_path / job / "history.jsonl" for job in ("job0", "job1")]
    deadline = time.time() + 120
    while not all(h.exists() and "dense/epoch" in h.read_text() for h in histories) and time.time() < deadline:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)  # returns once every process holding the pipes is gone
    assert err.count("stopped: SIGTERM during dense training: saved step ") == 2, err[-2000:]
    for job in ("job0", "job1"):
        assert json.loads((tmp_path / job / "metrics.json").read_text())["error"].startswith("StopRequested: ")
