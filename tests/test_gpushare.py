"""Jobs sharing a GPU: training of the others pauses while one job benchmarks, and a waiting
benchmark is never starved by trainers that keep stepping."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from sparsebench.multirun.gpus import GpuShare


def test_benchmark_runs_alone_and_trainers_resume(tmp_path: Path) -> None:
    trainers = [GpuShare(0, tmp_path) for _ in range(2)]
    bencher = GpuShare(0, tmp_path)
    steps: list = []  # (job, start, end) of every training step
    stop = threading.Event()

    def train(job: int, share: GpuShare) -> None:
        while not stop.is_set():
            start = time.perf_counter()
            time.sleep(0.002)  # the step's work, done while holding the shared lock
            steps.append((job, start, time.perf_counter()))
            share.after_step(len(steps), None)

    threads = [threading.Thread(target=train, args=(i, s)) for i, s in enumerate(trainers)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    asked = time.perf_counter()
    with bencher.exclusive():
        entered = time.perf_counter()
        time.sleep(0.15)
        left = time.perf_counter()
    time.sleep(0.1)
    stop.set()
    for t in threads:
        t.join()
    for share in (*trainers, bencher):
        share.close()

    assert entered - asked < 0.1  # within a step or two of asking, though both trainers never stop
    for share in trainers:  # the pause is counted, so the training step time leaves it out
        assert 0.14 <= share.paused_s < 0.15 + 0.1
    overlapping = [s for s in steps if s[1] < left and s[2] > entered]
    assert not overlapping, overlapping[:3]
    for job in (0, 1):  # both trained before and after the benchmark
        assert any(end < entered for j, _, end in steps if j == job)
        assert any(start > left for j, start, _ in steps if j == job)


def test_a_trainer_finishes_its_gpu_work_before_a_benchmark_starts(tmp_path: Path, monkeypatch) -> None:
    import torch

    synced = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: synced.append(time.perf_counter()))
    trainer, bencher = GpuShare(0, tmp_path), GpuShare(0, tmp_path)
    trainer.after_step(1, None)
    assert synced == []  # nobody waits: the step's kernels stay queued (no sync per step)
    entered = []

    def benchmark() -> None:
        with bencher.exclusive():
            entered.append(time.perf_counter())
            time.sleep(0.05)

    waiting = threading.Thread(target=benchmark)
    waiting.start()
    time.sleep(0.05)  # the benchmark now holds the gate and waits for `use`
    trainer.after_step(2, None)  # syncs, lets go of `use`, waits while the benchmark runs
    waiting.join()
    assert len(synced) == 1 and synced[0] < entered[0]
    trainer.close()
    bencher.close()


def test_time_the_loop_spends_paused_is_not_training_time(tmp_path: Path) -> None:
    from types import SimpleNamespace

    import torch

    from sparsebench.data import Batches
    from sparsebench.train import TrainHook, fit

    class Waits(TrainHook):  # stands in for GpuShare waiting out another job's benchmark
        paused_s = 0.0

        def after_step(self, step, model):
            started = time.perf_counter()
            time.sleep(0.05)
            self.paused_s += time.perf_counter() - started

    x, y = torch.randint(0, 255, (64, 1, 4, 4), dtype=torch.uint8), torch.randint(0, 2, (64,))
    batches = Batches(x, y, torch.zeros(1), torch.ones(1), batch_size=16, shuffle=False)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    trainer = SimpleNamespace(
        optimizer="sgd",
        lr=0.1,
        momentum=0.0,
        weight_decay=0.0,
        scheduler="constant",
        label_smoothing=0.0,
        amp=False,
        compile=False,
        progress=False,
        checkpoint_every=0,
        checkpoint_epochs=1,
        eval_every=1,
    )
    waits = Waits()
    metrics = fit(
        model,
        batches,
        batches,
        trainer,
        phase="p",
        epochs=1,
        lr=0.1,
        hooks=[waits],
        checkpoint=tmp_path / "last.pt",
        paused=lambda: waits.paused_s,
    )
    assert metrics["p/paused_s"] >= 4 * 0.05
    assert metrics["p/step_ms"] < 25  # a 16x2 linear step; the 50 ms pauses are left out
