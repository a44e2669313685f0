"""The packed runtime: ``nn.Module``s that run packed layers, and a network rebuilt around them.

``packed_model(model, layers, meta)`` is a copy of ``model`` whose conv/linear layers are the packed
ones (our kernels on a GPU with ``use_kernels``, the reference on any device) and whose BatchNorms
folded into them at export are the identity: the whole network as the sparse kernels run it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, Mapping, Sequence, Tuple

import torch
from torch import nn

from sparsebench.layers import weight_layers
from sparsebench.sparse import ops
from sparsebench.sparse.format import PackedLayer, load_packed


class PackedConv2d(nn.Module):
    """One packed conv layer (BatchNorm folded in): through the kernels (``use_kernels``) for an input on a
    GPU, else through the reference (the kernels are CUDA only)."""

    def __init__(self, layer: PackedLayer, use_kernels: bool = False):
        super().__init__()
        self.layer, self.use_kernels = layer, use_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        op = ops.sparse_conv2d if self.use_kernels and x.is_cuda else ops.reference_conv2d
        return op(x, self._on(x.device))

    def _on(self, device: torch.device) -> PackedLayer:
        """The layer on ``device``, moved once (a move per call would copy every tensor every time)."""
        if self.layer.rowptr.device != device:
            self.layer = self.layer.to(device)
        return self.layer


class PackedLinear(PackedConv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        op = ops.sparse_linear if self.use_kernels and x.is_cuda else ops.reference_linear
        return op(x, self._on(x.device))


def swap_layers(model: nn.Module, replace: Mapping[str, nn.Module], identity: Sequence[str] = ()) -> nn.Module:
    """A copy of ``model`` in eval mode with the named submodules replaced and ``identity`` ones removed."""
    net = copy.deepcopy(model).eval()
    for name, module in replace.items():
        net.set_submodule(name, module)
    for name in identity:
        net.set_submodule(name, nn.Identity())
    return net


def packed_model(
    model: nn.Module, layers: Dict[str, PackedLayer], metadata: Dict[str, Any], use_kernels: bool = False
) -> nn.Module:
    """``model`` with its conv/linear layers running ``layers`` and its folded BatchNorms the identity."""
    modules = {
        name: (PackedConv2d if layer.kind == "conv2d" else PackedLinear)(layer, use_kernels)
        for name, layer in layers.items()
    }
    return swap_layers(model, modules, list(metadata.get("folded_bn", {}).values()))


def load_for_model(path: Path, model: nn.Module) -> Tuple[Dict[str, PackedLayer], Dict[str, Any]]:
    """Load ``path`` and check it belongs to ``model``: the same layers, shapes and geometry.

    Raises ValueError with one line naming the file and the first mismatch (a corrupt file
    is refused by ``load_packed`` with the tensor that fails its checksum).
    """
    layers, meta = load_packed(path)
    mine = weight_layers(model)
    missing, extra = sorted(set(mine) - set(layers)), sorted(set(layers) - set(mine))
    if missing or extra:
        raise ValueError(
            f"{path}: does not match this model: layers missing from the file {missing[:5]}, "
            f"layers the model lacks {extra[:5]}"
        )
    for name, m in mine.items():
        shape = tuple(m.weight.shape)
        if tuple(layers[name].weight_shape) != shape:
            raise ValueError(
                f"{path}: layer {name!r} has weight shape {tuple(layers[name].weight_shape)} in the file, "
                f"{shape} in the model"
            )
        if isinstance(m, nn.Conv2d) and (layers[name].stride, layers[name].padding) != (m.stride[0], m.padding[0]):
            raise ValueError(
                f"{path}: layer {name!r} has stride/padding {layers[name].stride}/{layers[name].padding} "
                f"in the file, {m.stride[0]}/{m.padding[0]} in the model"
            )
    return layers, meta
