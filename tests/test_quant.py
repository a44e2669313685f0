"""QAT: the grids, the fake-quant hook (levels, exact zeros, STE, resume) and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import sparsebench.checkpoints
import sparsebench.train
from sparsebench.errors import ConfigError
from sparsebench.experiment import run
from sparsebench.models import build_model
from sparsebench.prune.masks import weight_param
from sparsebench.quant import build_quantizer, grids
from sparsebench.quant.config import QuantConfig
from sparsebench.quant.hook import _most_distinct_per_row, layer_bits
from sparsebench.sparse.format import load_packed
from tests.conftest import TINY, compose, run_cli


def quant_cfg(**kw):
    return OmegaConf.structured(QuantConfig(**kw))


def tiny_convnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model("convnet", in_channels=1, num_classes=10, image_size=8, width=0.5)
    with torch.no_grad():  # BatchNorm statistics far from identity, so folding matters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.3, 3)
                m.weight.uniform_(0.5, 2)
                m.bias.uniform_(-0.5, 0.5)
    return model


def prune_half(model: nn.Module) -> dict:
    """Zero the smaller half of every layer's weights; returns the keep-masks."""
    masks = {}
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                w = weight_param(m)
                masks[name] = w.abs() > w.abs().median()
                w.mul_(masks[name])
    return masks


def train_steps(model: nn.Module, hook, masks: dict, steps: int = 6, first: int = 1) -> None:
    """A few SGD steps that keep the masks the way the pruner does (zero the original after each step)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x = torch.randn(32, 1, 8, 8)
    y = torch.randint(0, 10, (32,))
    modules = dict(model.named_modules())
    for step in range(first, first + steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for name, keep in masks.items():
                weight_param(modules[name]).mul_(keep)
        hook.after_step(step, model)


# ---------------------------------------------------------------- grids


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_linear_grid_has_at_most_2_to_bits_levels_per_channel_and_keeps_zero(bits, symmetric):
    torch.manual_seed(bits)
    w = torch.randn(6, 3, 3, 3)
    w[w.abs() < 0.5] = 0
    scale, zp = grids.linear_stats(w, bits, symmetric, per_channel=True)
    q = grids.linear_fake_quant(w, scale, zp, bits, symmetric)
    assert torch.equal(q[w == 0], torch.zeros_like(q[w == 0]))
    for c in range(6):
        levels = torch.unique(q[c])
        assert len(levels) <= 2**bits
        k = levels / scale[c] + zp[c]  # every value is scale * (integer code - zero point)
        assert torch.allclose(k, k.round(), atol=1e-4)
        lo, hi = grids.code_range(bits, symmetric)
        assert k.round().min() >= lo and k.round().max() <= hi
    # max-abs statistics: the largest weight of a symmetric channel is a level exactly
    if symmetric:
        assert torch.allclose(q.abs().amax(dim=(1, 2, 3)), w.abs().amax(dim=(1, 2, 3)))


def test_pow2_levels_are_signed_powers_of_two_and_zero():
    levels = grids.pow2_levels(3, torch.tensor([0.8]))
    assert levels.tolist() == pytest.approx([-0.8, -0.4, -0.2, 0.0, 0.2, 0.4, 0.8])
    assert len(grids.pow2_levels(2, torch.tensor([1.0]))) == 3  # ternary
    assert len(grids.pow2_levels(8, torch.tensor([1.0]))) == 255
    w = torch.tensor([0.0, 0.31, -0.29, 0.61, 2.0, 0.05])
    q = grids.level_fake_quant(w, levels)
    assert q.tolist() == pytest.approx([0.0, 0.4, -0.2, 0.8, 0.8, 0.0])


def test_kmeans_codebook_finds_the_clusters_and_keeps_an_exact_zero():
    torch.manual_seed(0)
    centres = torch.tensor([-1.0, -0.3, 0.5, 2.0])
    x = centres[torch.randint(0, 4, (4000,))] + 0.01 * torch.randn(4000)
    book = grids.fit_codebook(x, n_free=4, iters=50)
    assert len(book) == 5 and (book == 0).sum() == 1
    assert torch.allclose(book[book != 0], centres, atol=0.01)


def test_kmeans_rows_are_fitted_together_as_each_would_be_alone():
    torch.manual_seed(1)
    rows = torch.randn(5, 300) * torch.tensor([[0.01], [0.1], [1.0], [10.0], [1.0]])
    rows[rows.abs() < 0.3 * rows.abs().amax(dim=1, keepdim=True)] = 0  # pruned: zeros are not fitted
    rows[3] = 0
    rows[3, [7, 50, 51, 90, 299]] = torch.tensor([0.5, -2.0, 0.25, 3.0, -0.75])  # five values for seven free levels
    rows[4] = 0  # an all-zero channel
    books = grids.fit_codebook(rows, n_free=7, iters=40)
    assert books.shape == (5, 8) and bool((books == 0).any(dim=1).all())
    for r in range(3):  # batched Lloyd iterations: the same levels as the row's own fit, bit for bit
        assert torch.equal(books[r], grids.fit_codebook(rows[r][rows[r] != 0], n_free=7, iters=40))
    assert set(books[3].tolist()) == {0.0, 0.5, -2.0, 0.25, 3.0, -0.75}  # each value keeps its own level
    assert books[4].tolist() == [0.0] * 8 and grids.fit_codebook(torch.zeros(0), n_free=7).tolist() == [0.0] * 8
    # A warm refit starts each row from its own previous codebook.
    moved = rows * 1.01
    warm = grids.fit_codebook(moved, 7, 40, init=books)
    assert torch.equal(warm[2], grids.fit_codebook(moved[2], 7, 40, init=books[2]))


def test_straight_through_gradient_passes_unchanged():
    w = torch.tensor([0.12, -0.7, 0.0], requires_grad=True)
    q = grids.linear_fake_quant(w, torch.tensor([0.25]), torch.tensor([0.0]), 4, True)
    q.sum().backward()
    assert q.tolist() == [0.0, -0.75, 0.0] and w.grad.tolist() == [1.0, 1.0, 1.0]


# ---------------------------------------------------------------- the hook


def test_most_distinct_per_row_counts_each_rows_values():
    torch.manual_seed(0)
    rows = torch.randint(-3, 4, (50, 40)).float() * 0.25  # at most 7 values a row, repeated
    rows[7, :] = 0.5  # a row of one value
    rows[9, :20] = torch.arange(20) + 10.0  # the most: 20 new values beside at most 7
    want = max(len(torch.unique(r)) for r in rows)
    assert want > 20
    assert int(_most_distinct_per_row(rows)) == want
    assert int(_most_distinct_per_row(rows[7:8])) == 1


@pytest.mark.parametrize(
    "method,kw",
    [
        ("linear", {}),
        ("linear", {"symmetric": False, "per_channel": False}),
        ("linear", {"learn_scale": True}),
        ("pow2", {}),
        ("kmeans", {}),
        ("kmeans", {"kmeans_per_channel": True}),
    ],
)
def test_qat_keeps_exact_zeros_and_at_most_2_to_bits_levels(method, kw):
    model = tiny_convnet()
    masks = prune_half(model)
    hook = build_quantizer(quant_cfg(method=method, bits=3, **kw), model)
    hook.on_fit_start(model, steps_per_epoch=6, total_steps=6)
    train_steps(model, hook, masks)
    levels = hook.distinct_levels(model)
    assert set(levels) == {"block1.conv", "block2.conv", "block3.conv", "fc"}
    assert all(2 <= n <= 8 for n in levels.values()), levels
    hook.on_epoch_end(0, model)
    hook.on_fit_end(model)
    for name, m in model.named_modules():
        if name in masks:
            assert not hasattr(m, "parametrizations")  # baked into a plain parameter
            assert torch.equal(m.weight[~masks[name]], torch.zeros(int((~masks[name]).sum())))
    if method == "kmeans":  # the classifier (no BatchNorm) takes exactly the codebook values, each row its own
        book = hook.fake_quants["fc"].codebook
        assert book.shape == ((10, 8) if kw else (8,))
        books = book.reshape(-1, 8).expand(10, -1)
        for row, levels in zip(model.fc.weight, books):
            assert set(row.tolist()) <= set(levels.tolist())


def test_learned_scales_get_gradients_and_are_trained():
    model = tiny_convnet()
    hook = build_quantizer(quant_cfg(method="linear", bits=4, learn_scale=True), model)
    hook.on_fit_start(model, steps_per_epoch=4, total_steps=4)
    before = hook.fake_quants["block2.conv"].scale.detach().clone()
    assert any(p is hook.fake_quants["block2.conv"].scale for p in model.parameters())
    train_steps(model, hook, {}, steps=3)
    assert not torch.equal(before, hook.fake_quants["block2.conv"].scale.detach())


def test_qat_starts_at_quant_start():
    model = tiny_convnet()
    hook = build_quantizer(quant_cfg(method="linear", bits=2, start=1.0), model)
    hook.on_fit_start(model, steps_per_epoch=3, total_steps=6)
    train_steps(model, hook, {}, steps=2)
    assert not hook.active and len(torch.unique(model.fc.weight)) > 8  # still full precision
    train_steps(model, hook, {}, steps=3)
    assert hook.active and all(n <= 4 for n in hook.distinct_levels(model).values())


def test_qat_start_as_a_fraction_of_the_phase():
    model = tiny_convnet()
    hook = build_quantizer(quant_cfg(method="linear", bits=2, start=0.5, unit="fraction"), model)
    hook.on_fit_start(model, steps_per_epoch=3, total_steps=12)
    assert hook.start_step == 6  # half of the 12 steps, however many epochs they make
    train_steps(model, hook, {}, steps=5)
    assert not hook.active
    train_steps(model, hook, {}, steps=2, first=6)
    assert hook.active


def test_kmeans_starting_at_an_epoch_boundary_is_fitted_once_there():
    model = tiny_convnet()
    hook = build_quantizer(quant_cfg(method="kmeans", bits=3, start=2.0), model)
    hook.on_fit_start(model, steps_per_epoch=2, total_steps=8)
    fits = []
    for epoch in range(4):
        train_steps(model, hook, {}, steps=2, first=2 * epoch + 1)
        hook.on_epoch_end(epoch, model)
        fits.append(hook.fits)
    assert fits == [0, 1, 2, 2]  # activated at step 4 (fit 1), refitted after epoch 3, not after 2 or 4


def test_quant_start_at_the_end_quantizes_after_training_and_says_so(caplog):
    model = tiny_convnet()
    hook = build_quantizer(quant_cfg(method="linear", bits=2, start=2.0), model)
    hook.on_fit_start(model, steps_per_epoch=2, total_steps=4)
    train_steps(model, hook, {}, steps=4)
    assert not hook.active  # no step trains with the grids
    with caplog.at_level("WARNING"):
        hook.on_fit_end(model)
    assert "without quantization-aware retraining" in caplog.text
    assert len(torch.unique(model.fc.weight)) <= 4 * model.fc.weight.shape[0]  # baked: 2 bits per channel


def test_mixed_precision_overrides_by_name_and_regex():
    names = ["block1.conv", "block2.conv", "block3.conv", "fc"]
    cfg = quant_cfg(method="linear", bits=4, overrides={r"block[23]\.conv": 2, "fc": 8, "block3.conv": 32})
    assert {n: b for n, (b, _) in layer_bits(cfg, names).items()} == {
        "block1.conv": 4,
        "block2.conv": 2,
        "block3.conv": 32,
        "fc": 8,
    }
    assert layer_bits(cfg, names)["block2.conv"][1] == r"quant.overrides.block[23]\.conv"
    model = tiny_convnet()
    hook = build_quantizer(cfg, model)
    hook.on_fit_start(model, 1, 1)
    assert set(hook.fake_quants) == {"block1.conv", "block2.conv", "fc"}  # 32: left in fp32
    assert hook.fake_quants["fc"].bits == 8 and hook.fake_quants["block2.conv"].bits == 2


@pytest.mark.parametrize("per_channel", [False, True])
def test_hook_state_round_trips_through_a_checkpoint(per_channel):
    model = tiny_convnet()
    masks = prune_half(model)
    cfg = quant_cfg(method="kmeans", bits=3, kmeans_per_channel=per_channel)
    hook = build_quantizer(cfg, model)
    hook.on_fit_start(model, 6, 6)
    train_steps(model, hook, masks)
    hook.on_epoch_end(0, model)
    checkpoint = {"model": model.state_dict(), "hook": hook.state_dict()}
    x = torch.randn(4, 1, 8, 8)
    expected = model.eval()(x)

    fresh = tiny_convnet(seed=1)
    again = build_quantizer(cfg, fresh)
    again.on_fit_start(fresh, 6, 6)  # the loop's resume order: re-parametrize, load model, load hook
    fresh.load_state_dict(checkpoint["model"])
    again.load_state_dict(checkpoint["hook"])
    assert again.active and again.fits == hook.fits
    assert torch.equal(again.fake_quants["fc"].codebook, hook.fake_quants["fc"].codebook)
    assert torch.equal(fresh.eval()(x), expected)


def test_resume_in_the_finetune_phase_reaches_the_same_export(tmp_path: Path, monkeypatch):
    # batch 128: 12 steps an epoch on digits, so the crash lands mid-way through the second finetune epoch
    overrides = [
        *TINY,
        "bench=none",
        "data.batch_size=128",
        "trainer.finetune_epochs=2",
        "prune=agp",
        "prune.end=1",
        "quant=kmeans",
        "quant.bits=3",
        "trainer.checkpoint_every=5",
        "trainer.deterministic=true",
    ]
    reference = run(compose(*overrides), tmp_path / "uninterrupted")
    save = sparsebench.checkpoints.save

    def crash_in_finetune(obj, path):
        save(obj, path)
        if obj.get("phase") == "finetune" and obj.get("step") == 15:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(sparsebench.checkpoints, "save", crash_in_finetune)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(compose(*overrides), tmp_path / "resumed")
    monkeypatch.setattr(sparsebench.checkpoints, "save", save)
    # Resumed with other codebooks: one line naming the key (and the checkpoint still resumes after).
    with pytest.raises(
        ConfigError,
        match="checkpoint was quantized with quant.kmeans_per_channel=False, this run "
        "asks for quant.kmeans_per_channel=True",
    ):
        run(compose(*overrides, "trainer.resume=true", "quant.kmeans_per_channel=true"), tmp_path / "resumed")
    resumed = run(compose(*overrides, "trainer.resume=true"), tmp_path / "resumed")

    assert resumed["acc_final"] == reference["acc_final"]
    assert resumed["footprint_bytes"] == reference["footprint_bytes"]
    a, _ = load_packed(tmp_path / "uninterrupted" / "packed.safetensors")
    b, _ = load_packed(tmp_path / "resumed" / "packed.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name].dequantize(), b[name].dequantize()), name


# ---------------------------------------------------------------- bad input


def test_kmeans_with_more_levels_than_nonzeros_is_refused_before_training():
    model = tiny_convnet()  # block1.conv: 16 x 1 x 3 x 3 = 144 weights
    with pytest.raises(ConfigError, match=r"quant.bits=8 .*'block1.conv'.*255 levels.*144 non-zero"):
        build_quantizer(quant_cfg(method="kmeans", bits=8), model)
    with pytest.raises(ConfigError, match=r"quant.overrides.block1\\.conv=8 .*'block1.conv'"):
        build_quantizer(quant_cfg(method="kmeans", bits=4, overrides={r"block1\.conv": 8}), model)


@pytest.mark.parametrize(
    "args,key",
    [
        (["quant=linear", "quant.bits=9"], "quant.bits=9 is not allowed: an integer in 2..8"),
        (["quant=pow2", "quant.bits=1"], "quant.bits=1 is not allowed: an integer in 2..8"),
        (["quant=kmeans", "quant.bits=8"], "quant.bits=8 is not allowed for layer 'block1.conv'"),
        (["quant=linear", "++quant.overrides={nope:4}"], "quant.overrides.nope: matches no conv/linear layer"),
        (["quant=linear", "++quant.overrides={fc:12}"], "quant.overrides.fc=12 is not allowed"),
        (["quant=linear", "quant.start=1.5"], "quant.start=1.5 is not allowed: a fraction of the finetune phase"),
        (["quant=linear", "quant.unit=epoch", "quant.start=5"], "quant.start=5.0 is not allowed: at most trainer."),
        (["quant=linear", "quant.unit=step"], "quant.unit='step' is not allowed: epoch or fraction"),
    ],
)
def test_bad_quant_input_is_refused_before_training(tmp_path: Path, args, key):
    with pytest.raises(ConfigError) as refused:
        run(compose(*TINY, "prune=none", "trainer.finetune_epochs=1", *args), tmp_path)
    assert key in str(refused.value) and "\n" not in str(refused.value)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "dense_bytes" not in metrics  # refused before any training


def test_a_quant_error_from_the_cli_is_one_line(tmp_path: Path):
    result = run_cli(*TINY, "prune=none", "quant=kmeans", "quant.bits=8", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "quant.bits=8 is not allowed for layer 'block1.conv'" in error_lines[0]


def test_kmeans_layer_pruned_below_its_level_count_keeps_one_level_per_value():
    model = tiny_convnet()
    hook = build_quantizer(quant_cfg(method="kmeans", bits=4), model)  # 15 free levels
    with torch.no_grad():
        w = model.fc.weight
        w.zero_()
        w.view(-1)[:5] = torch.tensor([0.5, -0.25, 0.125, 0.5, 1.0])  # pruning left 5 non-zeros, 4 values
    hook.on_fit_start(model, 1, 1)
    book = hook.fake_quants["fc"].codebook
    assert len(book) == 16 and set(book.tolist()) == {0.0, 0.5, -0.25, 0.125, 1.0}
    assert torch.equal(model.fc.weight, w.detach())  # every value is its own level


@pytest.mark.parametrize("per_channel", [False, True])
def test_kmeans_codebooks_are_refitted_every_refit_every_epochs(per_channel):
    model = tiny_convnet()
    hook = build_quantizer(quant_cfg(method="kmeans", bits=3, refit_every=2, kmeans_per_channel=per_channel), model)
    hook.on_fit_start(model, steps_per_epoch=2, total_steps=10)
    assert hook.fits == 1  # fitted when QAT starts (step 0)
    fits, books = [], []
    for epoch in range(4):
        train_steps(model, hook, {}, steps=2)
        hook.on_epoch_end(epoch, model)
        fits.append(hook.fits)
        books.append(hook.fake_quants["fc"].codebook.clone())
    assert fits == [1, 2, 2, 3]  # after epochs 2 and 4
    assert not torch.equal(books[0], books[1])  # the refit followed the trained weights
    assert torch.equal(books[1], books[2])  # and between refits the codebook stays put


def test_per_channel_kmeans_fits_channels_of_different_scales_better_than_one_codebook():
    # Output channels whose weights differ in scale by 2x each (1/16 .. 8), half of them pruned: one
    # 15-level codebook spends its levels on the large channels and rounds the small ones away.
    def quantized(per_channel: bool):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(16, 8, 3, bias=False))
        with torch.no_grad():
            w = model[0].weight
            w.copy_(torch.randn(8, 16, 3, 3) * (2.0 ** torch.arange(8.0) / 16).reshape(-1, 1, 1, 1))
            w[torch.rand(8, 16, 3, 3) < 0.5] = 0
            original = w.clone()
        hook = build_quantizer(quant_cfg(method="kmeans", bits=4, kmeans_per_channel=per_channel), model)
        hook.on_fit_start(model, 1, 1)
        error = (model[0].weight.detach() - original).flatten(1)
        worst_channel = (error.norm(dim=1) / original.flatten(1).norm(dim=1)).max()
        return (error.norm() / original.norm()).item(), worst_channel.item()

    layer_error, layer_worst = quantized(False)
    channel_error, channel_worst = quantized(True)
    assert channel_error < 0.7 * layer_error  # 0.093 against 0.165
    assert channel_worst < 0.2 < 0.5 < layer_worst  # the smallest channel: 0.13 against 0.78


def test_per_channel_kmeans_takes_channels_with_fewer_weights_than_levels():
    # 8 bits is refused per layer (255 levels, 144 weights) but fine per channel: a channel with fewer
    # non-zeros than levels gives each its own level, and an all-zero channel stays zero.
    model = tiny_convnet()
    with torch.no_grad():
        model.block1.conv.weight[3] = 0
        w = model.block1.conv.weight.clone()
    hook = build_quantizer(quant_cfg(method="kmeans", bits=8, kmeans_per_channel=True), model)
    hook.on_fit_start(model, 1, 1)
    fq = hook.fake_quants["block1.conv"]
    assert fq.codebook.shape == (16, 256)
    assert torch.equal(fq.quantize_folded(fq.folded_input(w)), fq.folded_input(w))  # 9 weights a channel: lossless
    assert torch.equal(model.block1.conv.weight[3], torch.zeros(1, 3, 3)) and not fq.codebook[3].any()


def test_kmeans_codebook_is_not_refitted_after_the_last_epoch():
    # The model evaluated at the last epoch's end is the one baked and exported.
    model = tiny_convnet()
    hook = build_quantizer(quant_cfg(method="kmeans", bits=3, refit_every=1), model)
    hook.on_fit_start(model, steps_per_epoch=2, total_steps=4)
    train_steps(model, hook, {}, steps=2)
    hook.on_epoch_end(0, model)
    assert hook.fits == 2  # refitted after the first of two epochs
    train_steps(model, hook, {}, steps=2)
    trained = model.fc.weight.detach().clone()
    hook.on_epoch_end(1, model)
    assert hook.fits == 2
    hook.on_fit_end(model)
    assert torch.equal(model.fc.weight, trained)
    # refit_every=2 over four epochs: after the second, not after the fourth (the last).
    model = tiny_convnet()
    hook = build_quantizer(quant_cfg(method="kmeans", bits=3, refit_every=2), model)
    hook.on_fit_start(model, steps_per_epoch=2, total_steps=8)
    fits = []
    for epoch in range(4):
        train_steps(model, hook, {}, steps=2)
        hook.on_epoch_end(epoch, model)
        fits.append(hook.fits)
    assert fits == [1, 2, 2, 2]


@pytest.mark.parametrize("method", ["linear", "pow2", "kmeans"])
def test_only_the_method_a_key_belongs_to_reads_it(method):
    # method_reads (reports leave a key blank on jobs that ignore it) must agree with what training does:
    # changing a key changes a job of its method and leaves every other method's job as it was.
    from sparsebench.quant.config import ONE_METHOD_KEYS, method_reads

    def trained_output(**kw) -> torch.Tensor:
        model = tiny_convnet()
        prune_half(model)
        hook = build_quantizer(quant_cfg(method=method, bits=3, **kw), model)
        hook.on_fit_start(model, steps_per_epoch=2, total_steps=6)
        torch.manual_seed(1)
        for epoch in range(3):
            train_steps(model, hook, {}, steps=2, first=2 * epoch + 1)
            hook.on_epoch_end(epoch, model)
        return model.eval()(torch.randn(8, 1, 8, 8)).detach()

    changed = {
        "symmetric": False,
        "per_channel": False,
        "learn_scale": True,
        "refit_every": 2,
        "kmeans_iters": 2,
        "kmeans_per_channel": True,
    }
    assert set(changed) == set(ONE_METHOD_KEYS) and set(ONE_METHOD_KEYS) <= set(QuantConfig.__dataclass_fields__)
    default = trained_output()
    for key, value in changed.items():
        assert torch.equal(trained_output(**{key: value}), default) != method_reads(method, key), (key, value)
    assert method_reads(method, "bits") and not method_reads("none", "refit_every")
