"""Whole-network latency: the model with every conv/linear layer running on one backend.

Each network is a copy of the model in eval mode whose weight layers are replaced by the
backend's prepared callables (the rest: BN, pooling, residual adds, runs in the backend's
activation dtype and layout). Its output is checked against the fp64 dense model first.
On the GPU both sides are captured into CUDA graphs and replayed (no Python or launch
overhead on either side); the L2 cache is flushed before every timed replay.
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sparsebench.bench.backends import Prepared
from sparsebench.bench.cases import LayerCase
from sparsebench.bench.measure import MismatchError, TimingSettings, relative_error
from sparsebench.sparse.modules import swap_layers
from sparsebench.sparse.timing import Timing, time_calls

log = logging.getLogger("sparsebench.bench")

# A network compounds per-layer rounding through many layers: a looser bound than per layer.
NETWORK_TOL_FACTOR = 10.0


class LayerCall(nn.Module):
    """A weight layer replaced by a backend's callable (holds no parameters of its own)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def _with_layers(
    model: nn.Module,
    calls: Dict[str, Callable],
    device: torch.device,
    dtype: torch.dtype,
    channels_last: bool = False,
    folded: Sequence[str] = (),
) -> nn.Module:
    """``folded``: BatchNorms the export folded into the packed layers; they become the identity."""
    net = swap_layers(model, {name: LayerCall(fn) for name, fn in calls.items()}, folded)
    net = net.to(device=device, dtype=dtype)
    return net.to(memory_format=torch.channels_last) if channels_last else net


def reference_network(
    model: nn.Module, cases: Sequence[LayerCase], device: torch.device, folded: Sequence[str] = ()
) -> nn.Module:
    """The dense model in fp64 on ``device``, with the cases' weights."""
    weights = {
        c.name: (c.weight.to(device, torch.float64), c.bias.to(device, torch.float64) if c.bias is not None else None)
        for c in cases
    }

    def layer(c: LayerCase):
        w, b = weights[c.name]
        if c.kind == "conv2d":
            return lambda x: F.conv2d(x, w, b, stride=c.stride, padding=c.padding)
        return lambda x: F.linear(x, w, b)

    return _with_layers(model, {c.name: layer(c) for c in cases}, device, torch.float64, folded=folded)


def backend_network(
    model: nn.Module, prepared: Dict[str, Prepared], device: torch.device, folded: Sequence[str] = ()
) -> nn.Module:
    first = next(iter(prepared.values()))
    return _with_layers(
        model, {name: p.run for name, p in prepared.items()}, device, first.dtype, first.channels_last, folded
    )


def check_network(
    name: str, net: nn.Module, prepared: Prepared, x: torch.Tensor, ref: torch.Tensor, batch: int
) -> float:
    with torch.no_grad(), prepared.context():
        y = net(prepared.convert(x))
    err = relative_error(y.float(), ref)
    tol = NETWORK_TOL_FACTOR * prepared.tol
    if not err <= tol:
        raise MismatchError(
            f"bench: the whole network on backend {name} (batch {batch}) differs from the dense "
            f"fp64 model: max error {err:.3g} of the largest output, allowed {tol:g}"
        )
    return err


class Captured:
    """A network forward on a static input, captured into a CUDA graph."""

    def __init__(self, net: nn.Module, x: torch.Tensor, prepared: Prepared):
        self.x = x
        with torch.no_grad(), prepared.context():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up (cuDNN autotuning) outside the capture
                for _ in range(3):
                    net(x)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = net(x)
        torch.cuda.synchronize()


def time_networks(
    nets: Dict[str, nn.Module],
    prepared: Dict[str, Prepared],
    x: torch.Tensor,
    device: torch.device,
    settings: TimingSettings,
    graphs: bool,
) -> tuple:
    """Median latency per backend; CUDA graphs on every side or (if any capture fails) on none."""
    inputs = {name: prepared[name].convert(x) for name in nets}
    calls: Dict[str, Callable] = {}
    used_graphs = False
    if device.type == "cuda" and graphs:
        try:
            captured = {name: Captured(net, inputs[name], prepared[name]) for name, net in nets.items()}
            calls = {name: c.graph.replay for name, c in captured.items()}
            used_graphs = True
        except RuntimeError as e:
            log.warning(
                "bench: CUDA graph capture failed (%s); timing every network eagerly instead", str(e).splitlines()[0]
            )
    if not used_graphs:
        calls = {name: (lambda net=net, xi=inputs[name]: net(xi)) for name, net in nets.items()}
    out: Dict[str, Timing] = {}
    for name, call in calls.items():
        with torch.no_grad(), prepared[name].context():
            out[name] = time_calls(
                [call],
                device,
                warmup=settings.warmup,
                repeats=settings.repeats,
                cache="flush",
                cpu_threads=settings.cpu_threads,
            )
    return out, used_graphs


def network_input(sample: torch.Tensor, batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *sample.shape[1:]), generator=g)
