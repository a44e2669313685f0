"""Jobs sharing a GPU: training of the others pauses while one job benchmarks, and a waiting
benchmark is never starved by trainers that keep stepping."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from sparsebench.gpushare import GpuShare


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
    overlapping = [s for s in steps if s[1] < left and s[2] > entered]
    assert not overlapping, overlapping[:3]
    for job in (0, 1):  # both trained before and after the benchmark
        assert any(end < entered for j, _, end in steps if j == job)
        assert any(start > left for j, start, _ in steps if j == job)
