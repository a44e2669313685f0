"""The packed sparse format on the CPU: packing, decoding, sizes, files, and the ops' validation."""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from sparsebench.sparse import format as fmt
from sparsebench.sparse.codes import pack_codes, unpack_codes
from sparsebench.sparse.format import load_packed, pack_weight, save_packed
from sparsebench.sparse.ops import reference_conv2d, reference_linear, sparse_conv2d, sparse_linear
from sparsebench.sparse.synthetic import codebook_codes, linear_codes, random_layer, random_sparse_weight


def sparse_weight(shape, sparsity=0.7, seed=0):
    return random_sparse_weight(shape, sparsity, torch.Generator().manual_seed(seed))


def test_float_round_trip_is_exact_and_stores_only_nonzeros():
    w = sparse_weight((7, 5, 3, 3), 0.8)
    layer = pack_weight(w, torch.arange(7.0), stride=2, padding=1)
    assert layer.nnz == int((w != 0).sum()) == round(0.2 * w.numel())
    assert torch.equal(layer.dequantize(), w)
    assert layer.value_kind == "float32" and layer.bits == 32
    assert (layer.stride, layer.padding, layer.kernel_size) == (2, 1, (3, 3))
    assert layer.sparsity == pytest.approx(0.8, abs=1e-3)
    # rows sorted by nnz, heaviest first, and a permutation
    counts = (layer.rowptr[1:] - layer.rowptr[:-1])[layer.row_order.long()]
    assert torch.all(counts[:-1] >= counts[1:])
    assert sorted(layer.row_order.tolist()) == list(range(7))


def test_fp16_values_round_to_half():
    w = sparse_weight((4, 6), 0.5)
    layer = pack_weight(w, value_dtype=torch.float16)
    assert layer.values.dtype == torch.float16 and layer.bits == 16
    assert torch.equal(layer.dequantize(), w.half().float())


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_linear_codes_round_trip(bits):
    w = sparse_weight((6, 4, 3, 3), 0.6, seed=bits)
    codes, scale, zp = linear_codes(w, bits)
    layer = pack_weight(w, bits=bits, codes=codes, scale=scale, zero_point=zp)
    expect = scale[:, None, None, None] * (codes - zp[:, None, None, None]).float()
    assert torch.equal(layer.dequantize(), expect)
    assert layer.values.dtype == torch.uint8
    assert layer.values.numel() == (layer.nnz * bits + 7) // 8
    assert torch.equal(layer.codes(), codes.reshape(6, -1)[layer.rows(), layer.columns()].long())


def test_signed_codes_are_shifted_without_changing_values():
    w = torch.tensor([[0.0, 1.0, -2.0, 0.0], [3.0, 0.0, 0.0, -1.0]])
    codes = torch.tensor([[0, 1, -2, 0], [3, 0, 0, -1]], dtype=torch.int8)
    layer = pack_weight(w, bits=4, codes=codes, scale=torch.tensor([1.0, 1.0]))
    assert layer.zero_point.tolist() == [8, 8]
    assert int(layer.codes().min()) >= 0
    assert torch.equal(layer.dequantize(), w)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_codebook_round_trip(bits):
    w = sparse_weight((5, 3, 3, 3), 0.5, seed=10 + bits)
    codes, levels = codebook_codes(w, bits, torch.Generator().manual_seed(1))
    layer = pack_weight(w, bits=bits, codes=codes, codebook=levels)
    assert layer.value_kind == "codebook" and layer.codebook.numel() == 2**bits
    assert torch.equal(layer.dequantize(), levels[codes.long()])
    assert layer.nnz == int((levels[codes.long()] != 0).sum())


def test_per_channel_codebook_decodes_each_row_through_its_own_levels():
    w = sparse_weight((6, 4, 3, 3), 0.5, seed=3)
    codes, books = codebook_codes(w, 4, torch.Generator().manual_seed(2), per_channel=True)
    layer = pack_weight(w, bits=4, codes=codes, codebook=books)
    assert layer.value_kind == "codebook" and layer.codebook.shape == (6, 16)
    rows = torch.arange(6).reshape(6, 1, 1, 1).expand_as(codes)
    assert torch.equal(layer.dequantize(), books[rows, codes.long()])
    assert torch.equal(layer.nonzero_values(), books[layer.rows(), layer.codes()])
    # Through row 0's codebook alone the other rows come out wrong: the decode really is per row.
    assert not torch.allclose(layer.dequantize()[1:], books[0][codes.long()][1:])
    # The footprint counts every row's codebook: 6 x 16 fp32 levels.
    flat = pack_weight(w, bits=4, codes=codes, codebook=books[0])
    assert layer.footprint_bytes() - flat.footprint_bytes() == (6 - 1) * 16 * 4


def test_per_tensor_scale_broadcasts():
    w = sparse_weight((3, 8), 0.5)
    codes, _, _ = linear_codes(w, 8)
    layer = pack_weight(w, bits=8, codes=codes, scale=0.5, zero_point=128)
    assert layer.scale.tolist() == [0.5] * 3 and layer.zero_point.tolist() == [128] * 3


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_code_packing_is_little_end_first(bits):
    codes = torch.randint(0, 2**bits, (37,), generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, bits)
    assert packed.numel() == (37 * bits + 7) // 8
    assert torch.equal(unpack_codes(packed, bits, 37), codes)
    # first code sits in the low bits of byte 0
    assert int(packed[0]) & (2**bits - 1) == int(codes[0])


def test_footprint_arithmetic():
    w = torch.zeros(4, 10, 3, 3)
    w[0, 0, 0, 0] = 1.0
    w[3, 9, 2, 2] = -2.0
    w[3, 1, 1, 1] = 0.5
    layer = pack_weight(w, torch.ones(4))
    # rowptr 5*4 + colidx 3*2 (16-bit) + row_order 4*4 + values 3*4 + bias 4*4
    assert layer.footprint_bytes() == 20 + 6 + 16 + 12 + 16
    assert layer.dense_bytes() == 4 * (360 + 4)
    codes, scale, zp = linear_codes(w, 4)
    q = pack_weight(w, bits=4, codes=codes, scale=scale, zero_point=zp)
    # rowptr 20 + colidx 6 + row_order 16 + codes 2 bytes (3 x 4 bits) + scale 16 + zero_point 16, no bias
    assert q.footprint_bytes() == 20 + 6 + 16 + 2 + 16 + 16
    assert q.dense_bytes() == 4 * 360


def test_index_width_follows_row_length():
    assert pack_weight(sparse_weight((2, 7281, 3, 3), 0.99)).colidx.dtype == torch.int16  # 65529 columns
    wide = pack_weight(sparse_weight((2, 65537), 0.999, seed=3))
    assert wide.colidx.dtype == torch.int32
    # unsigned 16-bit: columns past 32767 come back intact
    w = torch.zeros(1, 60000)
    w[0, [5, 40000, 59999]] = 1.0
    layer = pack_weight(w)
    assert layer.colidx.dtype == torch.int16 and layer.columns().tolist() == [5, 40000, 59999]
    assert torch.equal(layer.dequantize(), w)


def test_empty_rows_and_all_zero_weight():
    w = sparse_weight((6, 4, 3, 3), 0.5)
    w[[1, 4]] = 0
    layer = pack_weight(w)
    assert (layer.rowptr[2] - layer.rowptr[1]).item() == 0
    assert torch.equal(layer.dequantize(), w)
    empty = pack_weight(torch.zeros(3, 2, 1, 1), torch.tensor([1.0, 2.0, 3.0]))
    assert empty.nnz == 0 and empty.sparsity == 1.0
    y = reference_conv2d(torch.randn(2, 2, 4, 4), empty)
    assert torch.equal(y[:, 2], torch.full((2, 4, 4), 3.0))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bits=3, codes=torch.zeros(2, 3, dtype=torch.int32), scale=1.0), "bits"),
        (dict(bits=4), "codes"),
        (dict(bits=4, codes=torch.zeros(2, 3), scale=1.0), "codes: expected an integer"),
        (dict(bits=4, codes=torch.zeros(3, 2, dtype=torch.int32), scale=1.0), "codes: expected shape"),
        (
            dict(bits=4, codes=torch.full((2, 3), 16, dtype=torch.int32), scale=1.0),
            r"codes: expected values in \[0, 16\)",
        ),
        (dict(bits=4, codes=torch.zeros(2, 3, dtype=torch.int32)), "scale/codebook"),
        (dict(bits=4, codes=torch.zeros(2, 3, dtype=torch.int32), scale=torch.ones(3)), "scale: expected"),
        (dict(bits=2, codes=torch.zeros(2, 3, dtype=torch.int32), codebook=torch.zeros(5)), "codebook: expected 1..4"),
        (
            dict(bits=2, codes=torch.zeros(2, 3, dtype=torch.int32), codebook=torch.zeros(2, 5)),
            "codebook: expected 1..4",
        ),
        (
            dict(bits=2, codes=torch.zeros(2, 3, dtype=torch.int32), codebook=torch.zeros(3, 4)),
            r"codebook: expected \[levels\] \(one for the layer\) or \[2, levels\] \(one per output channel\), "
            r"got shape \(3, 4\)",
        ),
        (
            dict(bits=2, codes=torch.zeros(2, 3, dtype=torch.int32), codebook=torch.zeros(2, 1, 4)),
            r"got shape \(2, 1, 4\)",
        ),
        (
            dict(bits=2, codes=torch.full((2, 3), 3, dtype=torch.int32), codebook=torch.ones(2, 3)),
            r"codes: expected codebook indices in \[0, 3\)",
        ),
        (dict(scale=1.0), "bits"),
        (dict(value_dtype=torch.bfloat16), "value_dtype"),
        (dict(stride=2), "stride/padding"),
    ],
)
def test_pack_weight_refuses_bad_arguments(kwargs, match):
    w = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]])
    with pytest.raises(ValueError, match=match):
        pack_weight(w, **kwargs)


def test_pruned_weights_must_decode_to_zero():
    w = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    codes = torch.tensor([[9, 9], [8, 10]])  # w[0,1] is pruned but code 9 != zero point 8
    with pytest.raises(ValueError, match="1 pruned"):
        pack_weight(w, bits=4, codes=codes, scale=1.0, zero_point=8)


def variety():
    return {
        "conv_f32": random_layer((5, 3, 3, 3), 0.7, stride=2, padding=1, seed=1),
        "conv_f16": random_layer((4, 3, 5, 5), 0.5, value="float16", seed=2),
        "conv_lin4": random_layer((6, 2, 1, 1), 0.3, value="linear", bits=4, seed=3),
        "fc_code2": random_layer((3, 11), 0.6, value="codebook", bits=2, bias=False, seed=4),
        "conv_code4_rows": random_layer((5, 3, 3, 3), 0.5, value="codebook", bits=4, per_channel=True, seed=5),
    }


def test_save_load_round_trip(tmp_path):
    layers = variety()
    path = tmp_path / "sub" / "packed.safetensors"
    save_packed(path, layers, {"model": "tiny", "acc": 0.5})
    assert [p.name for p in path.parent.iterdir()] == ["packed.safetensors"]  # no temp file left behind
    loaded, meta = load_packed(path)
    assert meta == {"model": "tiny", "acc": 0.5}
    assert list(loaded) == list(layers)
    for name, layer in layers.items():
        got = loaded[name]
        assert got.geometry() == layer.geometry()
        for tname, t in layer.tensors().items():
            assert torch.equal(got.tensors()[tname], t), (name, tname)
        assert torch.equal(got.dequantize(), layer.dequantize())


def _rewrite(path, tensors, meta):
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=meta)


def _read(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_corrupted_tensor_fails_checksum(tmp_path):
    path = tmp_path / "p.safetensors"
    save_packed(path, variety(), {})
    tensors, meta = _read(path)
    tensors["conv_f16/values"] = tensors["conv_f16/values"].clone()
    tensors["conv_f16/values"][0] += 1
    _rewrite(path, tensors, meta)
    with pytest.raises(ValueError, match="layer 'conv_f16' tensor 'values' fails its checksum"):
        load_packed(path)


def test_flipped_byte_on_disk_is_refused(tmp_path):
    path = tmp_path / "p.safetensors"
    save_packed(path, variety(), {})
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # somewhere in the last tensor's data
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="fails its checksum"):
        load_packed(path)


def test_truncated_or_foreign_files_are_refused(tmp_path):
    path = tmp_path / "p.safetensors"
    save_packed(path, variety(), {})
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_packed(path)
    other = tmp_path / "o.safetensors"
    _rewrite(other, {"a": torch.zeros(2)}, {"hello": "x"})
    with pytest.raises(ValueError, match="not a sparsebench packed file"):
        load_packed(other)


def test_shape_mismatch_names_layer_and_tensor(tmp_path):
    path = tmp_path / "p.safetensors"
    save_packed(path, variety(), {})
    tensors, meta = _read(path)
    index = json.loads(meta["layers"])
    bad = torch.zeros(4, dtype=torch.float32)  # a scale of the wrong length, with a matching checksum
    tensors["conv_lin4/scale"] = bad
    index["conv_lin4"]["sha256"]["scale"] = fmt._digest(bad)
    meta["layers"] = json.dumps(index)
    _rewrite(path, tensors, meta)
    with pytest.raises(ValueError, match=r"conv_lin4\.scale: expected shape \(6,\)"):
        load_packed(path)


def test_a_per_channel_codebook_with_the_wrong_rows_or_dims_is_refused(tmp_path):
    path = tmp_path / "p.safetensors"
    save_packed(path, variety(), {})
    tensors, meta = _read(path)
    index = json.loads(meta["layers"])
    for bad, match in (
        (torch.zeros(4, 16), r"conv_code4_rows\.codebook: expected shape \(5, 16\)"),
        (torch.zeros(5, 1, 16), r"conv_code4_rows\.codebook: expected \[levels\] or \[5, levels\]"),
        (torch.zeros(5, 32), r"conv_code4_rows\.codebook: .*with 1\.\.16 levels"),
    ):
        tensors["conv_code4_rows/codebook"] = bad
        index["conv_code4_rows"]["sha256"]["codebook"] = fmt._digest(bad)
        meta["layers"] = json.dumps(index)
        _rewrite(path, tensors, meta)
        with pytest.raises(ValueError, match=match):
            load_packed(path)


def test_inconsistent_row_pointers_are_refused(tmp_path):
    layer = random_layer((4, 3), 0.5, seed=5)
    layer.rowptr = layer.rowptr.flip(0).contiguous()
    with pytest.raises(ValueError, match="rowptr"):
        fmt.check_layer_data(layer, "fc")
    path = tmp_path / "p.safetensors"
    save_packed(path, {"fc": layer}, {})
    with pytest.raises(ValueError, match=r"fc\.rowptr: must start at 0"):
        load_packed(path)


def test_reference_ops_match_dense_torch():
    layer = random_layer((6, 4, 3, 3), 0.6, value="linear", bits=8, stride=2, padding=1, seed=7)
    x = torch.randn(3, 4, 9, 9)
    w = layer.dequantize()
    assert torch.allclose(reference_conv2d(x, layer, relu=True), F.relu(F.conv2d(x, w, layer.bias, 2, 1)))
    fc = random_layer((5, 7), 0.5, value="codebook", bits=4, seed=8)
    xf = torch.randn(2, 7)
    assert torch.allclose(reference_linear(xf, fc), F.linear(xf, fc.dequantize(), fc.bias))
    assert reference_conv2d(x.half(), layer).dtype == torch.float16


def test_ops_validate_before_needing_a_gpu():
    conv = random_layer((4, 3, 3, 3), 0.5, padding=1, seed=9)
    fc = random_layer((4, 6), 0.5, seed=9)
    with pytest.raises(ValueError, match="x: expected a 4-D tensor"):
        sparse_conv2d(torch.randn(3, 8, 8), conv)
    with pytest.raises(ValueError, match="x: has 5 channels"):
        sparse_conv2d(torch.randn(1, 5, 8, 8), conv)
    with pytest.raises(ValueError, match="x: dtype must be float32, float16 or bfloat16"):
        sparse_conv2d(torch.randn(1, 3, 8, 8).double(), conv)
    with pytest.raises(ValueError, match="sparse_conv2d needs a conv2d layer"):
        sparse_conv2d(torch.randn(1, 6, 1, 1), fc)
    with pytest.raises(ValueError, match="sparse_linear needs a linear layer"):
        sparse_linear(torch.randn(1, 3), conv)
    with pytest.raises(ValueError, match="smaller than the 3x3 kernel"):
        sparse_conv2d(torch.randn(1, 3, 1, 1), random_layer((4, 3, 3, 3), 0.5, seed=9))
    broken = random_layer((4, 3, 3, 3), 0.5, seed=9)
    broken.values = broken.values[:-1]
    with pytest.raises(ValueError, match=r"layer\.values: expected shape"):
        sparse_conv2d(torch.randn(1, 3, 8, 8), broken)
    with pytest.raises(ValueError, match="layer: expected a PackedLayer"):
        sparse_conv2d(torch.randn(1, 3, 8, 8), {"not": "a layer"})


def test_device_check_names_the_tensor():
    from sparsebench.sparse import ops

    conv = random_layer((4, 3, 3, 3), 0.5, padding=1, seed=9)
    with pytest.raises(ValueError, match="x: must be on a CUDA device"):
        ops._check_device(torch.randn(1, 3, 8, 8), conv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without a GPU")
def test_no_gpu_gives_one_clear_line():
    from sparsebench.errors import ConfigError

    conv = random_layer((4, 3, 3, 3), 0.5, padding=1, seed=9)
    with pytest.raises(ConfigError, match="backend direct_sparse needs a CUDA GPU and the compiled sparsebench._C"):
        sparse_conv2d(torch.randn(1, 3, 8, 8), conv)


def test_skewed_row_counts_are_exact_capped_and_skew_with_sigma():
    from sparsebench.sparse.synthetic import skewed_row_counts

    empty = {}
    for sigma in (0.5, 2.0, 20.0, 400.0):  # 400: exp(sigma * z) would overflow; softmax does not
        counts = skewed_row_counts(64, 72, 460, sigma, torch.Generator().manual_seed(1))
        assert int(counts.sum()) == 460 and int(counts.max()) <= 72 and int(counts.min()) >= 0
        empty[sigma] = int((counts == 0).sum())
    assert empty[0.5] <= empty[2.0] <= empty[20.0] and empty[20.0] >= 50  # more sigma: fewer, fuller rows
    assert skewed_row_counts(4, 3, 12, 2.0, torch.Generator()).tolist() == [3, 3, 3, 3]  # every row full
    with pytest.raises(ValueError, match="does not fit"):
        skewed_row_counts(4, 3, 13, 2.0, torch.Generator())


def test_longest_row_is_counted_where_the_layer_is_built_and_travels_with_it():
    from sparsebench.sparse.synthetic import random_layer

    layer = random_layer((40, 16, 3, 3), 0.8, empty_rows=3, row_skew=1.0, seed=2)
    counts = layer.rowptr[1:] - layer.rowptr[:-1]
    assert layer._row_nnz_max == int(counts.max()) > 2 * float(counts.float().mean())  # counted at build
    moved = layer.to("meta")  # no data on meta tensors: the count must come along, not be re-read
    assert moved.row_nnz_max == layer.row_nnz_max
    thinned = dataclasses.replace(
        layer, rowptr=torch.zeros(41, dtype=torch.int32), colidx=layer.colidx[:0], values=layer.values[:0]
    )
    assert thinned.row_nnz_max == 0  # a replaced rowptr is counted afresh
