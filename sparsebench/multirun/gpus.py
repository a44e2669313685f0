"""GPUs for a sweep's jobs: one per job running at once, and fair sharing when jobs outnumber them.

``claim_gpu``: jobs running at once on one host (joblib workers) each hold a GPU of their own.
``GpuShare``: jobs that share a GPU train side by side but time their benchmarks alone.

Training a small CNN is host-bound, so several jobs on one GPU finish a sweep sooner; but a
benchmark timed while another job trains would be wrong. Two ``flock`` files per GPU order it:

- ``use``: each job holds it *shared* while it works, *exclusive* while it benchmarks;
- ``gate``: a benchmark holds it while it waits, so trainers cannot re-take ``use`` and starve it.

Trainers let go of ``use`` for a moment after every optimizer step (``after_step``, as a
training hook), so a waiting benchmark starts within one step of every other job and they
pause until it ends (``paused_s``: the training loop leaves those seconds out of its step time).
A trainer that sees the gate taken first waits for its queued GPU work, so none of it runs inside
the benchmark. A job never waits for the gate while holding ``use`` (no deadlock), and the kernel
drops both locks when a job's process dies.
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import nn

from sparsebench.train import TrainHook

log = logging.getLogger("sparsebench")


def default_lock_dir() -> Path:
    """Where the GPU lock files of this user live (one set per host)."""
    return Path(tempfile.gettempdir()) / f"sparsebench-gpus-{os.getuid()}"


@contextmanager
def claim_gpu(n_gpus: int, job_num: int, lock_dir: Optional[Path] = None) -> Iterator[Optional[int]]:
    """Hold one GPU index for the duration of a job, or yield None when there is nothing to choose.

    Jobs running at once on one host (joblib workers) each take the first free GPU, starting at
    ``job_num % n_gpus`` so that a serial sweep spreads too. "Free" is an exclusive ``flock`` on
    a per-GPU lock file: the kernel releases it when the job ends or its process dies, so a
    crashed job never leaves a GPU claimed. With every GPU taken, jobs share ``job_num % n_gpus``.
    """
    if n_gpus <= 1:
        yield 0 if n_gpus == 1 else None
        return
    locks = Path(lock_dir or default_lock_dir())
    locks.mkdir(parents=True, exist_ok=True)
    first = job_num % n_gpus
    for gpu in [(first + i) % n_gpus for i in range(n_gpus)]:
        f = open(locks / f"gpu{gpu}.lock", "w")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            continue
        try:
            yield gpu
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
            f.close()
        return
    log.warning("all %d GPUs are taken by other jobs; job %d shares GPU %d", n_gpus, job_num, first)
    yield first


class GpuShare(TrainHook):
    """One job's place on a shared GPU. ``exclusive()`` around the benchmark; the hook in every fit."""

    name = "gpu_share"

    def __init__(self, gpu: int, locks: Optional[Path] = None):
        locks = Path(locks or default_lock_dir())
        locks.mkdir(parents=True, exist_ok=True)
        self._gate = open(locks / f"gpu{gpu}.gate", "w")
        self._use = open(locks / f"gpu{gpu}.use", "w")
        self.paused_s = 0.0  # seconds spent waiting for another job's benchmark
        self._take_shared()

    def _take_shared(self) -> None:
        fcntl.flock(self._gate, fcntl.LOCK_EX)  # waits while a benchmark is queued or running
        fcntl.flock(self._use, fcntl.LOCK_SH)
        fcntl.flock(self._gate, fcntl.LOCK_UN)

    def after_step(self, step: int, model: nn.Module) -> None:
        if self._benchmark_waiting() and torch.cuda.is_available():
            torch.cuda.synchronize()  # this step's queued kernels finish before the benchmark starts
        fcntl.flock(self._use, fcntl.LOCK_UN)  # let a waiting benchmark in
        started = time.perf_counter()
        self._take_shared()
        self.paused_s += time.perf_counter() - started  # fit() leaves it out of the step time

    def _benchmark_waiting(self) -> bool:
        """Someone holds the gate: a benchmark (or, for a moment, another trainer taking `use`)."""
        try:
            fcntl.flock(self._gate, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(self._gate, fcntl.LOCK_UN)
        return False

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """The GPU to this job alone: waits for every other job on it to finish its step."""
        fcntl.flock(self._use, fcntl.LOCK_UN)  # never wait for the gate while holding `use`
        fcntl.flock(self._gate, fcntl.LOCK_EX)
        fcntl.flock(self._use, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._use, fcntl.LOCK_UN)
            fcntl.flock(self._gate, fcntl.LOCK_UN)
            self._take_shared()

    def close(self) -> None:
        self._use.close()
        self._gate.close()

    def __enter__(self) -> "GpuShare":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
