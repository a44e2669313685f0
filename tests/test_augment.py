"""TrivialAugment: every batched operation against PIL's, which the paper's code uses image by image."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from sparsebench.augment import FILL, LEVELS, OPS, apply_ops, draw, trivial_augment

STRENGTHS = [k / (LEVELS - 1) for k in range(-(LEVELS - 1), LEVELS)]  # every level trivial_augment draws, both signs
GEOMETRIC = ("shear_x", "shear_y", "translate_x", "translate_y", "rotate")


def images(channels: int, n: int = 6, size: tuple = (32, 32)) -> torch.Tensor:
    """Smooth images over different ranges, plus a flat one and a two-level one (edge cases of the histogram ops)."""
    h, w = size
    g = torch.Generator().manual_seed(channels)
    coarse = torch.rand(n, channels, h // 4, w // 4, generator=g)
    smooth = torch.nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
    lo = torch.tensor([0, 40, 90, 0, 10, 200])[:n].view(-1, 1, 1, 1)
    span = torch.tensor([255, 100, 30, 100, 240, 50])[:n].view(-1, 1, 1, 1)
    x = (lo + smooth * span).round().clamp(0, 255).to(torch.uint8)
    x[0, :, 0, :4] = 255  # saturated pixels: solarize inverts them even at threshold 255
    x[3, :, 0, :2] = torch.tensor([0, 100], dtype=torch.uint8)  # a range of exactly 100: autocontrast scales by 2.55
    x[-2] = 77  # flat
    x[-1] = torch.where(torch.rand(channels, h, w, generator=g) < 0.3, 20, 180).to(torch.uint8)
    return x


def pil_reference(img: Image.Image, name: str, s: float) -> Image.Image:
    w, h = img.size
    m = abs(s)
    fill = FILL if img.mode == "L" else (FILL,) * 3
    affine = {
        "shear_x": (1, 0.99 * s, 0, 0, 1, 0),
        "shear_y": (1, 0, 0, 0.99 * s, 1, 0),
        "translate_x": (1, 0, s * w, 0, 1, 0),
        "translate_y": (1, 0, 0, 0, 1, s * h),
    }
    enhance = {
        "brightness": ImageEnhance.Brightness,
        "color": ImageEnhance.Color,
        "contrast": ImageEnhance.Contrast,
        "sharpness": ImageEnhance.Sharpness,
    }
    if name == "identity":
        return img
    if name in affine:
        return img.transform(img.size, Image.AFFINE, affine[name], fillcolor=fill)
    if name == "rotate":
        return img.rotate(135 * s, fillcolor=fill)
    if name in enhance:
        return enhance[name](img).enhance(1 + 0.99 * s)
    if name == "posterize":
        return ImageOps.posterize(img, 8 - round(6 * m))
    if name == "solarize":
        return ImageOps.solarize(img, threshold=255 * (1 - m))
    if name == "autocontrast":
        return ImageOps.autocontrast(img)
    return ImageOps.equalize(img)


def to_pil(x: torch.Tensor) -> Image.Image:
    a = x.permute(1, 2, 0).numpy()
    return Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a)


def from_pil(img: Image.Image) -> torch.Tensor:
    a = np.array(img)
    return torch.from_numpy(a[:, :, None] if a.ndim == 2 else a).permute(2, 0, 1)


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("name", OPS)
def test_each_operation_matches_pil(name, channels):
    for size in ((32, 32), (24, 40)) if name in GEOMETRIC else ((32, 32),):
        x = images(channels, size=size)
        n = len(x)
        for s in STRENGTHS:
            ours = apply_ops(x, torch.full((n,), OPS.index(name)), torch.full((n,), s, dtype=torch.float64))
            ref = torch.stack([from_pil(pil_reference(to_pil(img), name, s)) for img in x])
            if name in GEOMETRIC:
                # Nearest-neighbour ties (a source point exactly between two pixels, at 135 degrees the
                # whole diagonal) round either way; PIL maps them in fixed point.
                assert (ours != ref).float().mean() < 0.02, (name, size, s)
            else:
                assert torch.equal(ours, ref), (name, s, (ours.int() - ref.int()).abs().max().item())


def test_strength_zero_leaves_the_image_for_all_but_the_fixed_operations():
    x = images(3)
    n = len(x)
    for name in OPS:
        out = apply_ops(x, torch.full((n,), OPS.index(name)), torch.zeros(n))
        if name in ("solarize", "autocontrast", "equalize"):
            continue  # solarize still inverts 255s (threshold 255); the other two have no strength
        assert torch.equal(out, x), name
    # Full strength does something to every non-flat image.
    for name in ("shear_x", "translate_y", "rotate", "brightness", "contrast", "posterize", "solarize"):
        out = apply_ops(x[:4], torch.full((4,), OPS.index(name)), torch.ones(4))
        assert all(not torch.equal(o, i) for o, i in zip(out, x[:4])), name


def test_images_in_one_batch_get_their_own_operation():
    x = images(3)
    ops = torch.tensor(
        [OPS.index(n) for n in ("rotate", "equalize", "identity", "solarize", "brightness", "posterize")]
    )
    s = torch.tensor([0.4, 0.0, 0.9, -1.0, -0.6, 0.5])
    batched = apply_ops(x, ops, s)
    for i in range(len(x)):
        assert torch.equal(batched[i], apply_ops(x[i : i + 1], ops[i : i + 1], s[i : i + 1])[0])


def test_draws_cover_every_operation_level_and_sign():
    op, strength = draw(5000, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert set(op.tolist()) == set(range(len(OPS)))
    assert set((strength.abs() * (LEVELS - 1)).round().long().tolist()) == set(range(LEVELS))
    assert (strength < 0).any() and (strength > 0).any() and strength.dtype == torch.float64


def test_trivial_augment_is_reproducible_and_the_same_in_any_chunks():
    x = images(3, n=6).repeat(200, 1, 1, 1)
    a = trivial_augment(x, torch.Generator().manual_seed(5))
    b = trivial_augment(x, torch.Generator().manual_seed(5))
    c = trivial_augment(x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.uint8 and a.shape == x.shape
    changed = (a != x).flatten(1).any(1).float().mean().item()
    assert 0.6 < changed < 0.97  # identity, strength 0 and flat images leave some unchanged
    assert torch.equal(trivial_augment(x, torch.Generator().manual_seed(5), chunk=7), a)


def test_refuses_what_it_cannot_augment():
    with pytest.raises(ValueError, match="uint8 N x C x H x W images with C = 1 or 3"):
        apply_ops(torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long), torch.zeros(2))
    with pytest.raises(ValueError, match="got torch.uint8 \\(2, 4, 8, 8\\)"):
        apply_ops(torch.zeros(2, 4, 8, 8, dtype=torch.uint8), torch.zeros(2, dtype=torch.long), torch.zeros(2))


@pytest.mark.cuda
def test_the_gpu_gives_the_cpu_result():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    x = images(3).repeat(len(OPS), 1, 1, 1)
    ops = torch.arange(len(OPS)).repeat_interleave(6)
    s = torch.linspace(-1, 1, len(ops), dtype=torch.float64)
    cpu = apply_ops(x, ops, s)
    gpu = apply_ops(x.cuda(), ops.cuda(), s.cuda()).cpu()
    moved = torch.isin(ops, torch.tensor([OPS.index(n) for n in GEOMETRIC]))
    assert torch.equal(cpu[~moved], gpu[~moved])
    assert (cpu[moved] != gpu[moved]).float().mean() < 0.01  # nearest-neighbour ties may fall either way
    many = images(3).repeat(500, 1, 1, 1).cuda()
    whole = trivial_augment(many, torch.Generator(device="cuda").manual_seed(1))
    chunked = trivial_augment(many, torch.Generator(device="cuda").manual_seed(1), chunk=7)
    assert (chunked != whole).float().mean() < 1e-3  # at most a tie of a geometric op falls the other way
