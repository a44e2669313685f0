"""What the model's conv and linear layers look like: shapes, sparsity, bytes."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

WEIGHT_LAYERS = (nn.Conv2d, nn.Linear)


def weight_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """Every conv and linear layer, by qualified name, in forward-definition order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, WEIGHT_LAYERS)}


def matching_layers(key: str, names: Sequence[str]) -> List[str]:
    """The layers a per-layer override key names: the exact name, else every full match of it as a regex."""
    return [key] if key in names else [n for n in names if re.fullmatch(key, n)]


def resolve_overrides(names: Sequence[str], keys: Sequence[str]) -> Tuple[Dict[str, str], List[str]]:
    """For per-layer overrides (pruning targets, bit-widths) keyed by layer name or regex: the key
    that sets each layer (an exact name beats any regex, and a later regex an earlier one) and the
    keys that match no layer, in the order given."""
    chosen: Dict[str, str] = {}
    unmatched: List[str] = []
    for key in [k for k in keys if k not in names] + [k for k in keys if k in names]:
        hits = matching_layers(key, names)
        if not hits:
            unmatched.append(key)
        chosen.update({n: key for n in hits})
    return chosen, unmatched


def sparsity(model: nn.Module, names: Optional[Sequence[str]] = None) -> float:
    """Fraction of exactly-zero weights over the named layers (default: every conv/linear)."""
    layers = weight_layers(model)
    chosen = [layers[n] for n in (names if names is not None else layers)]
    zeros = sum(int((m.weight == 0).sum()) for m in chosen)
    total = sum(m.weight.numel() for m in chosen)
    return zeros / max(total, 1)


def dense_bytes(module: nn.Module) -> int:
    """fp32 bytes of the weight and bias, as a dense model stores them."""
    return 4 * (module.weight.numel() + (module.bias.numel() if module.bias is not None else 0))


@torch.no_grad()
def input_shapes(model: nn.Module, sample: torch.Tensor) -> Dict[str, List[int]]:
    """Each weight layer's real input shape (batch 1), from one forward pass."""
    return {name: seen.in_shape for name, seen in trace(model, sample).items()}


def macs_per_weight(model: nn.Module, sample: torch.Tensor) -> Dict[str, int]:
    """How many multiply-adds each weight of a layer costs per sample: the positions it is applied
    at (a conv's output height x width, 1 for a linear layer on a vector), over every call."""
    return {name: seen.macs_per_weight for name, seen in trace(model, sample).items()}


@dataclass
class Traced:
    """What one forward pass shows of a weight layer."""

    in_shape: List[int]  # of its first call, without the batch
    macs_per_weight: int  # summed over its calls


@torch.no_grad()
def trace(model: nn.Module, sample: torch.Tensor) -> Dict[str, Traced]:
    """Each weight layer the forward pass of one sample reaches (batch 1)."""
    seen: Dict[str, Traced] = {}

    def record(name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            uses = output[0].numel() // module.weight.shape[0]  # each output of a channel uses its weights once
            if name in seen:
                seen[name].macs_per_weight += uses
            else:
                seen[name] = Traced(list(inputs[0].shape[1:]), uses)

        return hook

    handles = [m.register_forward_hook(record(name)) for name, m in weight_layers(model).items()]
    was_training = model.training
    model.eval()
    try:
        model(sample[:1])
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return seen


def describe(model: nn.Module, sample: torch.Tensor) -> List[Dict[str, Any]]:
    """One row per conv/linear layer with the layers.csv geometry columns."""
    seen = trace(model, sample)
    rows = []
    for name, m in weight_layers(model).items():
        w, traced = m.weight, seen.get(name, Traced([], 0))  # a layer the forward pass never reached: nothing
        row_nnz = (w.detach().reshape(w.shape[0], -1) != 0).sum(dim=1)
        is_conv = isinstance(m, nn.Conv2d)
        rows.append(
            {
                "layer": name,
                "kind": "conv2d" if is_conv else "linear",
                "in_shape": "x".join(map(str, traced.in_shape)),
                "out_channels": w.shape[0],
                "kernel": f"{w.shape[2]}x{w.shape[3]}" if is_conv else None,
                "stride": m.stride[0] if is_conv else None,
                "padding": m.padding[0] if is_conv else None,
                "params": w.numel(),
                "nnz": int(row_nnz.sum()),
                # Row-length skew: a sparse kernel that gives each output channel to one warp waits for the longest row.
                "row_nnz_max": int(row_nnz.max()),
                "rows_empty": int((row_nnz == 0).sum()),
                "sparsity": round(float((w == 0).float().mean()), 6),
                "macs_per_weight": traced.macs_per_weight,
                "dense_bytes": dense_bytes(m),
            }
        )
    return rows
