"""Latency measurement, the benchmark's and the autotuner's clock: CUDA events on the GPU, perf_counter on
the CPU; median and spread.

GPU method (per measured case):
- ``warmup`` untimed calls first (cuDNN autotuning, lazy allocations, clocks);
- every timed call is bracketed by its own pair of CUDA events, so each run is one sample;
- the cache flatters neither side: ``cache="flush"`` overwrites a buffer twice the L2 size
  before every timed call (weights and inputs come cold from HBM, as in a network forward),
  ``cache="rotate"`` cycles through the given calls (the caller passes enough input buffers
  to exceed L2, see ``rotation_count``);
- the GPU is kept ahead of Python: each chunk of runs is queued behind a ``torch.cuda._sleep``
  twice as long as the host needs to queue them (measured during warm-up), so host-side
  overhead (Python, argument checks, launches) never shows up as GPU idle time between the
  events: what is measured is GPU time, as in a CUDA graph replay.
The result is the median over ``repeats`` samples and the inter-quartile range.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

CACHE_MODES = ("flush", "rotate")
# An inter-quartile range above this share of the median marks a timing as noisy: a network timed with
# the GPU to itself spreads by about 1%, one timed beside other GPU work by tens of percent.
NOISY_SPREAD = 0.10
# Runs queued behind one GPU sleep; the sleep is sized from the measured host time per run.
_CHUNK = 16
_MAX_SLEEP_US = 50_000
_cycles_per_us: dict = {}


@dataclass(frozen=True)
class Timing:
    median_us: float
    p25_us: float
    p75_us: float
    runs: int

    @property
    def spread_us(self) -> float:
        """Inter-quartile range."""
        return self.p75_us - self.p25_us

    @property
    def noisy(self) -> bool:
        return self.spread_us > NOISY_SPREAD * self.median_us


def summarize(samples_us: Sequence[float]) -> Timing:
    if not samples_us:
        raise ValueError("summarize: no samples")
    qs = statistics.quantiles(samples_us, n=4, method="inclusive") if len(samples_us) > 1 else [samples_us[0]] * 3
    return Timing(median_us=statistics.median(samples_us), p25_us=qs[0], p75_us=qs[2], runs=len(samples_us))


def l2_bytes(device: torch.device) -> int:
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 0) or 64 << 20)


def rotation_count(bytes_per_input: int, device: torch.device, cap: int = 256) -> int:
    """Input buffers needed so one pass over them streams more than twice the L2 size (GPU), else 1."""
    if device.type != "cuda":
        return 1
    return max(2, min(cap, math.ceil(2 * l2_bytes(device) / max(1, bytes_per_input))))


class _Flusher:
    """Overwrites a buffer of twice the L2 size: whatever was cached is evicted."""

    _buffers: dict = {}

    def __init__(self, device: torch.device):
        key = (device.type, device.index)
        if key not in self._buffers:
            self._buffers[key] = torch.empty(2 * l2_bytes(device) // 4, dtype=torch.int32, device=device)
        self.buf = self._buffers[key]

    def __call__(self) -> None:
        self.buf.zero_()


def time_cuda(
    calls: Sequence[Callable[[], object]],
    *,
    warmup: int = 10,
    repeats: int = 50,
    cache: str = "flush",
    device: Optional[torch.device] = None,
) -> Timing:
    """Median GPU time of ``calls`` (run in rotation), one CUDA-event pair per run."""
    if cache not in CACHE_MODES:
        raise ValueError(f"cache: expected one of {CACHE_MODES}, got {cache!r}")
    device = device or torch.device("cuda", torch.cuda.current_device())
    flush = _Flusher(device) if cache == "flush" else None
    probe = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
    host_us = 0.0
    for i in range(max(warmup, 2)):  # warm-up, and the host's cost of queueing one run as timed below
        t0 = time.perf_counter()
        if flush is not None:
            flush()
        probe[0].record()
        calls[i % len(calls)]()
        probe[1].record()
        host_us = 1e6 * (time.perf_counter() - t0)  # the last one: caches and allocator are warm by then
    torch.cuda.synchronize(device)
    sleep_cycles = int(min(_MAX_SLEEP_US, 2.0 * _CHUNK * host_us + 100) * cycles_per_us(device))
    samples: List[float] = []
    done = 0
    while done < repeats:
        n = min(_CHUNK, repeats - done)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        torch.cuda._sleep(sleep_cycles)
        for k, (start, end) in enumerate(events):
            if flush is not None:
                flush()
            start.record()
            calls[(done + k) % len(calls)]()
            end.record()
        torch.cuda.synchronize(device)
        samples += [1000.0 * s.elapsed_time(e) for s, e in events]
        done += n
    return summarize(samples)


def cycles_per_us(device: torch.device) -> float:
    """GPU clock cycles per microsecond, measured once per device with ``torch.cuda._sleep``."""
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _cycles_per_us:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(1_000_000)  # clocks up
        start.record()
        torch.cuda._sleep(10_000_000)
        end.record()
        torch.cuda.synchronize(device)
        _cycles_per_us[key] = 10_000_000 / max(1.0, 1000.0 * start.elapsed_time(end))
    return _cycles_per_us[key]


def time_cpu(calls: Sequence[Callable[[], object]], *, warmup: int = 3, repeats: int = 20) -> Timing:
    """Median wall time of ``calls`` (run in rotation) with perf_counter, one sample per run."""
    for i in range(warmup):
        calls[i % len(calls)]()
    samples = []
    for i in range(repeats):
        t0 = time.perf_counter()
        calls[i % len(calls)]()
        samples.append(1e6 * (time.perf_counter() - t0))
    return summarize(samples)


def time_calls(
    calls: Sequence[Callable[[], object]],
    device: torch.device,
    *,
    warmup: int,
    repeats: int,
    cache: str = "flush",
    cpu_threads: int = 0,
) -> Timing:
    if device.type == "cuda":
        return time_cuda(calls, warmup=warmup, repeats=repeats, cache=cache, device=device)
    with cpu_thread_count(cpu_threads):
        return time_cpu(calls, warmup=warmup, repeats=repeats)


@contextlib.contextmanager
def cpu_thread_count(threads: int):
    """torch's intra-op threads for a while (0: leave as is). On a loaded host, multi-thread barriers
    get descheduled and tiny ops read as whole scheduler quanta; one thread measures the work."""
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)
