"""BatchNorm folding: which conv/linear feeds which BatchNorm, and the per-channel fold.

The packed conv is what the benchmark runs, so it carries the BatchNorm folded in
(weight * gamma/sqrt(var+eps) per output channel, bias beta - mean * that factor). The
quantizer quantizes that folded weight during QAT, so codebooks and per-tensor scales
describe exactly what is exported.
"""

from __future__ import annotations

import logging
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from sparsebench.layers import weight_layers

log = logging.getLogger(__name__)
_BN = nn.modules.batchnorm._BatchNorm


def bn_pairs(model: nn.Module) -> Dict[str, str]:
    """{weight layer name: BatchNorm name} for each conv/linear whose only consumer is a BatchNorm.

    Found by tracing the model with torch.fx; a model that does not trace falls back to
    "a BatchNorm right after the layer in the same nn.Sequential".
    """
    layers = weight_layers(model)
    modules = dict(model.named_modules())
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as e:  # untraceable control flow: the simple structural rule
        log.info("torch.fx could not trace the model (%s); folding BatchNorms that follow a layer in a Sequential", e)
        return _sequential_pairs(model)
    pairs = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BN) or not node.args:
            continue
        src = node.args[0]
        if getattr(src, "op", None) == "call_module" and src.target in layers and len(src.users) == 1:
            pairs[src.target] = node.target
    return pairs


def _sequential_pairs(model: nn.Module) -> Dict[str, str]:
    pairs = {}
    for prefix, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq.named_children())
        dot = f"{prefix}." if prefix else ""
        for (name, m), (next_name, nxt) in zip(children, children[1:]):
            if isinstance(m, (nn.Conv2d, nn.Linear)) and isinstance(nxt, _BN):
                pairs[dot + name] = dot + next_name
    return pairs


def bn_factor(bn: _BN) -> torch.Tensor:
    """gamma / sqrt(running_var + eps) per channel, as eval-mode BatchNorm applies it."""
    var = bn.running_var.detach().float()
    gamma = bn.weight.detach().float() if bn.weight is not None else torch.ones_like(var)
    return gamma / torch.sqrt(var + bn.eps)


def safe_factor(factor: torch.Tensor) -> torch.Tensor:
    """The fold factor with zeros (gamma == 0) replaced by 1, so dividing by it is always defined."""
    return torch.where(factor == 0, torch.ones_like(factor), factor)


def folded(
    weight: torch.Tensor, bias: Optional[torch.Tensor], bn: Optional[_BN]
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(weight, bias) with ``bn`` folded in (eval-mode statistics); unchanged when bn is None."""
    if bn is None:
        return weight, bias
    f = bn_factor(bn).to(weight.device)
    mean = bn.running_mean.detach().float().to(weight.device)
    beta = bn.bias.detach().float().to(weight.device) if bn.bias is not None else torch.zeros_like(mean)
    b = bias.detach().float() if bias is not None else torch.zeros_like(mean)
    w = weight.detach().float() * f.reshape(-1, *([1] * (weight.dim() - 1)))
    return w, beta + (b - mean) * f
