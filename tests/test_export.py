"""The packed export: round trip against the fake-quantized model, footprint arithmetic,
refusal of corrupt or mismatched files, and the pipeline with prune=agp quant=linear."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from sparsebench.experiment import run
from sparsebench.quant import build_quantizer, export_model
from sparsebench.quant.config import QuantConfig
from sparsebench.quant.export import storage_bits
from sparsebench.sparse.format import load_packed
from sparsebench.sparse.modules import load_for_model, packed_model
from sparsebench.sparse.ops import reference_conv2d, reference_linear
from tests.conftest import TINY, compose
from tests.test_quant import prune_half, tiny_convnet, train_steps


def quantize(model: nn.Module, **cfg):
    """A QAT hook on ``model``, started (quantization on from step 0)."""
    hook = build_quantizer(OmegaConf.structured(QuantConfig(**cfg)), model)
    hook.on_fit_start(model, 1, 1)
    return hook


def trained(method: str, bits: int = 4, **kw):
    model = tiny_convnet()
    masks = prune_half(model)
    hook = build_quantizer(OmegaConf.structured(QuantConfig(method=method, bits=bits, **kw)), model)
    hook.on_fit_start(model, steps_per_epoch=2, total_steps=4)
    for epoch in range(2):  # two epochs: a k-means codebook is re-fitted (warm) after the first
        train_steps(model, hook, masks, steps=2)
        hook.on_epoch_end(epoch, model)
    hook.on_fit_end(model)
    return model.eval(), hook, masks


# ---------------------------------------------------------------- round trip


@pytest.mark.parametrize(
    "method,kw",
    [
        ("linear", {}),
        ("linear", {"symmetric": False, "per_channel": False, "learn_scale": True}),
        ("pow2", {}),
        ("kmeans", {}),
        ("kmeans", {"kmeans_per_channel": True}),
        ("linear", {"bits": 3}),
    ],
)
def test_packed_layers_reproduce_the_fake_quantized_model(tmp_path: Path, method, kw):
    model, hook, masks = trained(method, **{"bits": 4, **kw})
    path = tmp_path / "packed.safetensors"
    facts = export_model(model, [hook], path)
    layers, meta = load_for_model(path, model)
    assert meta["folded_bn"] == {"block1.conv": "block1.bn", "block2.conv": "block2.bn", "block3.conv": "block3.bn"}
    bits = kw.get("bits", 4)
    for name, layer in layers.items():
        assert facts[name]["bits"] == bits and layer.bits == storage_bits(bits)
        values, rows = layer.nonzero_values(), layer.rows()
        if layer.value_kind == "codebook":  # every stored value is a level of its row's codebook; zero among them
            books = layer.codebook.reshape(-1, layer.codebook.shape[-1]).expand(layer.out_channels, -1)
            assert layer.codebook.dim() == (2 if kw.get("kmeans_per_channel") else 1)
            assert books.shape[1] <= 2**bits and bool((books == 0).any(dim=1).all())
            for r in range(layer.out_channels):
                assert set(values[rows == r].tolist()) <= set(books[r].tolist())
        else:  # per channel: at most 2**bits distinct levels, each scale * (integer code - zero point)
            for r in range(layer.out_channels):
                assert len(torch.unique(values[rows == r])) <= 2**bits
        dense = layer.dequantize()
        assert torch.equal(dense[~masks[name]], torch.zeros(int((~masks[name]).sum())))  # pruned: exactly 0
    assert torch.equal(layers["fc"].dequantize(), model.fc.weight)  # no BatchNorm: bit for bit

    # Each packed layer's output is its conv + BatchNorm's (eval), through the reference sparse op.
    inputs = {}

    def record(name):
        def hook(module, args, output):
            inputs[name] = (args[0].clone(), output.clone())  # clone: the next ReLU is in place

        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if n in layers or n.endswith(".bn")]
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        out = model(x)
        for name, layer in layers.items():
            layer_in = inputs[name][0]
            want = inputs[name.replace(".conv", ".bn")][1] if name in meta["folded_bn"] else inputs[name][1]
            got = (reference_conv2d if layer.kind == "conv2d" else reference_linear)(layer_in, layer)
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), name
        # ... and the whole packed network (folded BatchNorms as the identity) gives the model's logits.
        assert torch.allclose(packed_model(model, layers, meta)(x), out, rtol=1e-5, atol=1e-5)
    for h in handles:
        h.remove()


def test_unquantized_export_keeps_fp32_values_with_batchnorm_folded(tmp_path: Path):
    model = tiny_convnet().eval()
    prune_half(model)
    facts = export_model(model, [object()], tmp_path / "p.safetensors")  # a pruner-only run: no quant hook
    layers, meta = load_for_model(tmp_path / "p.safetensors", model)
    assert {f["bits"] for f in facts.values()} == {32} and {p.value_kind for p in layers.values()} == {"float32"}
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(packed_model(model, layers, meta)(x), model(x), rtol=1e-5, atol=1e-5)
        # With the kernels asked for, an input on the CPU still runs (through the reference: they are CUDA only).
        assert torch.allclose(packed_model(model, layers, meta, use_kernels=True)(x), model(x), rtol=1e-5, atol=1e-5)
    assert export_model(model, [], tmp_path / "none.safetensors") is None  # dense run: nothing to pack
    assert not (tmp_path / "none.safetensors").exists()


# ---------------------------------------------------------------- footprint arithmetic


def test_footprint_of_a_4bit_linear_layer_by_hand(tmp_path: Path):
    fc = nn.Linear(8, 4)
    with torch.no_grad():
        fc.weight.copy_(
            torch.tensor(
                [
                    [1.0, 0, 0, -0.5, 0, 0, 0.75, 0],  # 3 non-zeros
                    [0, 0, 0, 0, 0, 0, 0, 0],  # an empty row
                    [1.0, -1.0, 0.5, 0.5, -0.75, 1.0, 0.25, -0.25],  # 8
                    [0, 0, 0, 0, 0, 0, 0, 2.0],  # 1
                ]
            )
        )
    model = nn.Sequential(fc)
    hook = quantize(model, method="linear", bits=4)
    hook.on_fit_end(model)
    facts = export_model(model, [hook], tmp_path / "p.safetensors")["0"]
    # rowptr 5 x int32 + colidx 12 x int16 + row_order 4 x int32 = 20 + 24 + 16
    assert facts["index_bytes"] == 60
    assert facts["value_bytes"] == 6  # 12 codes x 4 bits
    assert facts["grid_bytes"] == 32  # scale 4 x fp32 + zero point 4 x int32
    assert facts["bias_bytes"] == 16
    assert facts["footprint_bytes"] == 60 + 6 + 32 + 16 == 114
    assert facts["dense_bytes"] == 4 * (32 + 4) == 144
    assert facts["compression"] == pytest.approx(144 / 114, abs=1e-4)
    assert facts["nnz"] == 12


@pytest.mark.parametrize("per_channel, codebook_bytes", [(False, 4 * 4), (True, 3 * 4 * 4)])
def test_footprint_of_a_2bit_kmeans_conv_with_folded_batchnorm_by_hand(tmp_path: Path, per_channel, codebook_bytes):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)).eval()
    with torch.no_grad():
        w = torch.zeros(3, 18)
        for row, count in zip(w, (7, 7, 6)):  # 20 non-zeros, every row on the three values: no code snaps to zero
            row[torch.randperm(18)[:count]] = torch.tensor([-1.0, 1.0, 2.0]).repeat(3)[:count]
        model[0].weight.copy_(w.reshape(3, 2, 3, 3))
    hook = quantize(model, method="kmeans", bits=2, kmeans_per_channel=per_channel)
    hook.on_fit_end(model)
    facts = export_model(model, [hook], tmp_path / "p.safetensors")["0"]
    assert facts["nnz"] == 20
    assert facts["index_bytes"] == 4 * 4 + 20 * 2 + 3 * 4  # rowptr + 16-bit column indices + row order
    assert facts["value_bytes"] == 5  # 20 codes x 2 bits
    assert facts["grid_bytes"] == codebook_bytes  # 4 fp32 levels, for the layer or for each of its 3 channels
    assert facts["bias_bytes"] == 3 * 4  # the folded BatchNorm's shift
    assert facts["footprint_bytes"] == 28 + 40 + 5 + codebook_bytes + 12
    assert facts["dense_bytes"] == 4 * (54 + 3) == 228


def test_3bit_codes_are_stored_at_4_bits():
    assert [storage_bits(b) for b in range(2, 9)] == [2, 4, 4, 8, 8, 8, 8]


# ---------------------------------------------------------------- refusing bad files


def test_corrupt_or_mismatched_files_are_refused_with_a_clear_message(tmp_path: Path):
    model, hook, _ = trained("linear")
    path = tmp_path / "packed.safetensors"
    export_model(model, [hook], path)
    data = bytearray(path.read_bytes())

    flipped = tmp_path / "flipped.safetensors"
    data_flipped = bytearray(data)
    data_flipped[-3] ^= 0xFF  # inside the last tensor's bytes
    flipped.write_bytes(bytes(data_flipped))
    with pytest.raises(ValueError, match="fails its checksum"):
        load_for_model(flipped, model)

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_for_model(truncated, model)

    narrow = tiny_convnet()
    narrow.block2.conv = nn.Conv2d(16, 8, 3, padding=1, bias=False)
    with pytest.raises(
        ValueError,
        match=r"layer 'block2.conv' has weight shape \(32, 16, 3, 3\) in the file, "
        r"\(8, 16, 3, 3\) in the model",
    ):
        load_for_model(path, narrow)
    with pytest.raises(ValueError, match="does not match this model"):
        load_for_model(path, nn.Sequential(nn.Linear(3, 3)))


# ---------------------------------------------------------------- the pipeline


def test_agp_pruning_with_8bit_qat_keeps_exact_zeros_and_reports_the_footprint(tmp_path: Path):
    metrics = run(
        compose(
            *TINY,
            "bench=none",
            "data.batch_size=128",
            "trainer.finetune_epochs=2",
            "prune=agp",
            "prune.end=1",
            "quant=linear",
        ),
        tmp_path,
    )
    assert metrics["weight_bits"] == 8 and metrics["sparsity"] == pytest.approx(0.9, abs=0.01)

    masks = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)["hooks"]["prune"]["masks"]
    layers, meta = load_packed(tmp_path / "packed.safetensors")
    assert set(masks) == {"block2.conv", "block3.conv"}  # first and last layers stay dense
    for name, keep in masks.items():
        dense = layers[name].dequantize()
        assert torch.equal(dense[~keep], torch.zeros(int((~keep).sum())))  # pruned positions: exactly 0
        assert layers[name].nnz <= int(keep.sum()) and layers[name].value_kind == "linear"
    assert meta["quant"]["bits"] == {n: 8 for n in layers}

    with open(tmp_path / "layers.csv") as f:
        rows = list({r["layer"]: r for r in csv.DictReader(f)}.values())  # one per layer (bench rows repeat them)
    assert [r["bits"] for r in rows] == ["8"] * 4
    for r in rows:
        layer = layers[r["layer"]]
        assert (
            int(r["footprint_bytes"])
            == layer.footprint_bytes()
            == sum(int(r[k]) for k in ("index_bytes", "value_bytes", "grid_bytes", "bias_bytes"))
        )
        assert int(r["dense_bytes"]) == layer.dense_bytes()
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["footprint_bytes"] == sum(int(r["footprint_bytes"]) for r in rows)
    assert saved["dense_bytes"] == sum(int(r["dense_bytes"]) for r in rows)
    assert saved["compression"] == pytest.approx(saved["dense_bytes"] / saved["footprint_bytes"])
    assert saved["compression"] > 4  # 90% sparse at 8 bits, even with 16-bit indices
