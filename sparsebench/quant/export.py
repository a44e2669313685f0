"""The packed export: every conv/linear layer of a trained model -> ``packed.safetensors``.

Each layer is written in the kernel module's format (``sparsebench.sparse.format``): CSR
indices of the non-zeros, values as codes at the quantizer's width (rounded up to a width
the format stores: 2, 4 or 8) with per-channel scale + zero point (linear) or a per-layer
codebook (pow2, kmeans; kmeans_per_channel: one per output channel), and the bias.
Unquantized layers keep fp32 values.

BatchNorm: a BatchNorm fed only by a conv/linear is folded into that layer (weight scaled
per output channel, bias = beta - mean * gamma/sqrt(var+eps)), so the packed conv is the
whole conv+BN the benchmark should time. The metadata lists the folded BatchNorms
(``folded_bn``), which a runner of the whole network replaces by the identity.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import torch
from torch import nn

from sparsebench.layers import weight_layers
from sparsebench.quant.config import FP32
from sparsebench.quant.fold import bn_pairs, folded
from sparsebench.sparse.codes import CODE_BITS
from sparsebench.sparse.format import PackedLayer, pack_weight, save_packed

if TYPE_CHECKING:  # annotations only: no import at run time
    from sparsebench.train import TrainHook


def storage_bits(bits: int) -> int:
    """The narrowest code width the packed format stores that holds ``bits``-bit codes."""
    fits = [b for b in sorted(CODE_BITS) if b >= bits]
    if not fits:
        raise ValueError(f"bits: {bits}-bit codes do not fit the packed format's widths {CODE_BITS}")
    return fits[0]


def pack_layer(module: nn.Module, bn: Optional[nn.Module], fake_quant: Optional[Any]) -> PackedLayer:
    """One layer, BatchNorm folded in, as codes on ``fake_quant``'s grid or as fp32 values."""
    weight, bias = folded(module.weight, module.bias, bn)
    geometry = {}
    if isinstance(module, nn.Conv2d):
        _check_conv(module)
        geometry = {"stride": int(module.stride[0]), "padding": int(module.padding[0])}
    if fake_quant is None:
        return pack_weight(weight, bias, **geometry)
    grid = fake_quant.encode(weight)
    return pack_weight(weight, bias, bits=storage_bits(fake_quant.bits), **geometry, **grid)


def _check_conv(m: nn.Conv2d) -> None:
    square = m.stride[0] == m.stride[1] and m.padding[0] == m.padding[1]
    if not square or m.dilation != (1, 1) or m.groups != 1 or isinstance(m.padding, str) or m.padding_mode != "zeros":
        raise ValueError(f"conv {m}: the packed format holds square stride/padding, dilation 1, groups 1 only")


def layer_facts(layer: PackedLayer, bits: int, method: str) -> Dict[str, Any]:
    """What layers.csv and metrics.json take from the export, bytes broken down by kind."""
    t = layer.tensors()
    size = lambda *names: sum(t[n].numel() * t[n].element_size() for n in names if n in t)  # noqa: E731
    footprint = layer.footprint_bytes()
    return {
        "bits": bits,
        "quant": method if bits != FP32 else "none",
        "storage_bits": layer.bits,
        "value_kind": layer.value_kind,
        "nnz": layer.nnz,
        "index_bytes": size("rowptr", "colidx", "row_order"),
        "value_bytes": size("values"),
        "grid_bytes": size("scale", "zero_point", "codebook"),
        "bias_bytes": size("bias"),
        "dense_bytes": layer.dense_bytes(),
        "footprint_bytes": footprint,
        "compression": round(layer.dense_bytes() / max(footprint, 1), 4),
    }


@torch.no_grad()
def export_packed(
    model: nn.Module, quantizer: Optional[Any], path: Path, metadata: Optional[Dict[str, Any]] = None
) -> Dict[str, Dict[str, Any]]:
    """Pack every conv/linear layer of ``model`` into ``path``; per-layer facts by layer name.

    ``quantizer`` (the ``quant`` hook, after training) supplies each quantized layer's grid;
    without it, or for a layer it leaves in fp32, the values are fp32.
    """
    modules = dict(model.named_modules())
    pairs = bn_pairs(model)
    fake_quants = quantizer.fake_quants if quantizer is not None else {}
    method = quantizer.method if quantizer is not None else "none"
    packed: Dict[str, PackedLayer] = {}
    facts: Dict[str, Dict[str, Any]] = {}
    for name, m in weight_layers(model).items():
        fq = fake_quants.get(name)
        packed[name] = pack_layer(m, modules.get(pairs[name]) if name in pairs else None, fq)
        facts[name] = layer_facts(packed[name], fq.bits if fq is not None else FP32, method)
    meta = {
        "folded_bn": pairs,
        "layer_order": list(packed),
        "quant": {"method": method, "bits": {n: f["bits"] for n, f in facts.items()}},
        **(metadata or {}),
    }
    save_packed(path, packed, meta)
    return facts


def export_model(model: nn.Module, hooks: List[TrainHook], path: Path) -> Optional[Dict[str, Dict[str, Any]]]:
    """Pack every conv/linear layer into ``path`` (packed.safetensors + metadata).

    Returns per-layer facts ``{layer: {"bits", "footprint_bytes", "dense_bytes", ...}}``, or
    None when nothing was exported: a run without pruning or quantization stays dense and
    reports the dense footprint. Quantized layers are stored as codes on their QAT grid,
    the others (``quant=none``, or a layer kept at 32 bits) as fp32 values; BatchNorms are
    folded into the layer that feeds them.
    """
    if not hooks:
        return None
    quantizer = next((h for h in hooks if getattr(h, "name", None) == "quant"), None)
    return export_packed(model, quantizer, Path(path))
