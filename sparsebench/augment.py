"""TrivialAugment (Müller & Hutter, ICCV 2021), per image and vectorised over a batch.

Each image gets one of 14 operations at a strength drawn uniformly from 31 levels, with a
random sign where the operation has one. The ranges are torchvision's TrivialAugmentWide
(solarize threshold 255 * (1 - level), enhance factors 1 +- 0.99 * level), except that
translations scale with the image (up to its side: 32 pixels on CIFAR, as there). The
operations follow PIL's (ImageOps, ImageEnhance, Image.transform), which the paper's own
code applies image by image; here every operation runs on the whole uint8 batch on its
device and each image keeps the result of its own, so a GPU-resident data set needs no
loader and no host round trip. torchvision's TrivialAugmentWide draws one operation per
call, so a batched tensor would get the same operation on every image.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

OPS = (
    "identity",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
    "rotate",
    "brightness",
    "color",
    "contrast",
    "sharpness",
    "posterize",
    "solarize",
    "autocontrast",
    "equalize",
)
LEVELS = 31
FILL = 128  # what geometric operations move in: the reference code's mid-grey
# The "wide" ranges; translations go up to the image side.
MAX_SHEAR, MAX_ROTATE_DEG, MAX_ENHANCE, MAX_POSTERIZE_DROP = 0.99, 135.0, 0.99, 6


def trivial_augment(x: Tensor, g: torch.Generator, chunk: int | None = None) -> Tensor:
    """x: uint8 N x C x H x W (C = 1 or 3). Returns a new uint8 batch of the same shape.

    Works through `chunk` images at a time; the result is the same for any chunk. On a GPU the
    ~100 kernel launches of a chunk cost more than its work (2.3 ms for 256 CIFAR images on an
    H200, 0.4 of it on the GPU), so chunks are large there; on a CPU small ones stay in cache.
    """
    n = x.shape[0]
    chunk = chunk or (4096 if x.is_cuda else 128)
    op, strength = draw(n, g, x.device)
    return torch.cat(
        [apply_ops(x[i : i + chunk], op[i : i + chunk], strength[i : i + chunk]) for i in range(0, n, chunk)]
    )


def draw(n: int, g: torch.Generator, device: torch.device) -> tuple[Tensor, Tensor]:
    """Per image: an operation (index into OPS) and a signed strength level / 30, in float64 as
    PIL gets it from Python (in float32, 16 of the 61 levels put brightness or solarize off PIL's)."""
    op = torch.randint(len(OPS), (n,), generator=g, device=device)
    level = torch.randint(LEVELS, (n,), generator=g, device=device).double() / (LEVELS - 1)
    sign = torch.randint(2, (n,), generator=g, device=device).double() * 2 - 1
    return op, level * sign


def apply_ops(x: Tensor, op: Tensor, strength: Tensor) -> Tensor:
    """Image i gets operation OPS[op[i]] at strength[i] in [-1, 1] (ops without a direction use |strength|)."""
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(
            f"trivial augment takes uint8 N x C x H x W images with C = 1 or 3, got {x.dtype} {tuple(x.shape)}"
        )
    picked = lambda name: (op == OPS.index(name)).view(-1, 1, 1, 1)  # noqa: E731
    strength = strength.double()
    s, m = strength.view(-1, 1, 1, 1), strength.abs().view(-1, 1, 1, 1)
    xi = x.long()
    f = x.float()
    gray = _luma(xi)
    out = torch.where(picked("identity"), f, _geometric(f, op, strength.float()))
    enhanced = {  # PIL's ImageEnhance: blend the image with a degenerate copy by factor 1 + strength
        "brightness": torch.zeros_like(f),
        "color": gray.expand_as(f),
        "contrast": torch.floor(gray.mean(dim=(1, 2, 3), keepdim=True) + 0.5).expand_as(f),
        "sharpness": _smooth(f),
    }
    for name, degenerate in enhanced.items():
        factor = (1 + MAX_ENHANCE * s).float()  # PIL's blend takes a C float
        blended = (degenerate + factor * (f - degenerate)).clamp(0, 255).floor()
        out = torch.where(picked(name), blended, out)
    drop = torch.round(MAX_POSTERIZE_DROP * m).long()  # low bits cleared: 0..6, so 8..2 bits kept
    out = torch.where(picked("posterize"), ((xi >> drop) << drop).float(), out)
    threshold = torch.ceil(255 * (1 - m)).float()  # pixel values are integers: >= the float64 threshold exactly
    out = torch.where(picked("solarize"), torch.where(f >= threshold, 255 - f, f), out)
    out = torch.where(picked("autocontrast"), _autocontrast(f), out)
    out = torch.where(picked("equalize"), _equalize(xi), out)
    return out.to(torch.uint8)


def _geometric(f: Tensor, op: Tensor, strength: Tensor) -> Tensor:
    """Shears (about the top-left corner, as PIL's), translations and rotations (about the centre),
    nearest-neighbour, as one grid_sample with a per-image affine map; other images get the identity."""
    n, _, h, w = f.shape
    shear, shift = MAX_SHEAR * strength, strength * w
    angle = math.radians(MAX_ROTATE_DEG) * strength
    eye = torch.eye(2, device=f.device).expand(n, 2, 2)
    zero = torch.zeros(n, device=f.device)
    a = eye.clone()  # where each output pixel reads, in pixels from the image centre: in = a @ out + b
    b = torch.zeros(n, 2, device=f.device)
    is_ = lambda name: op == OPS.index(name)  # noqa: E731
    a[:, 0, 1] = torch.where(is_("shear_x"), shear, zero)
    a[:, 1, 0] = torch.where(is_("shear_y"), shear, zero)
    b[:, 0] = torch.where(is_("shear_x"), shear * h / 2, torch.where(is_("translate_x"), shift, zero))
    b[:, 1] = torch.where(is_("shear_y"), shear * w / 2, torch.where(is_("translate_y"), shift * h / w, zero))
    rot = torch.stack([torch.stack([angle.cos(), -angle.sin()], -1), torch.stack([angle.sin(), angle.cos()], -1)], -2)
    a = torch.where(is_("rotate")[:, None, None], rot, a)
    half = torch.tensor([w / 2, h / 2], device=f.device)  # pixels -> grid_sample's [-1, 1]
    theta = torch.cat([a * half[None, None, :] / half[None, :, None], (b / half)[:, :, None]], dim=2)
    grid = F.affine_grid(theta, list(f.shape), align_corners=False)
    # Sample (image - FILL) so the zero padding comes back as FILL.
    return F.grid_sample(f - FILL, grid, mode="nearest", padding_mode="zeros", align_corners=False) + FILL


def _luma(xi: Tensor) -> Tensor:
    """PIL's RGB -> L (ITU-R 601-2, fixed point, rounded), N x 1 x H x W float."""
    if xi.shape[1] == 1:
        return xi.float()
    r, g, b = xi[:, 0:1], xi[:, 1:2], xi[:, 2:3]
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).float()


def _smooth(f: Tensor) -> Tensor:
    """PIL's ImageFilter.SMOOTH (3x3, centre 5, others 1, over 13), rounded; the border keeps its pixels.
    Integer weights keep the sums exact under any convolution algorithm (TF32 included)."""
    c = f.shape[1]
    kernel = torch.ones(3, 3, device=f.device)
    kernel[1, 1] = 5
    total = F.conv2d(f, kernel.expand(c, 1, 3, 3), groups=c)
    out = f.clone()
    out[:, :, 1:-1, 1:-1] = torch.div(2 * total + 13, 26, rounding_mode="floor")  # round(total / 13), half up
    return out


def _autocontrast(f: Tensor) -> Tensor:
    """PIL's ImageOps.autocontrast (no cutoff): each channel stretched from its min..max to 0..255,
    in float64 as PIL's Python computes its table (float32 puts some pixels one level off)."""
    d = f.double()
    lo = d.amin(dim=(2, 3), keepdim=True)
    hi = d.amax(dim=(2, 3), keepdim=True)
    # A true division: `255 / tensor` multiplies by a reciprocal, a last bit off PIL's table.
    scale = torch.full_like(hi, 255.0) / (hi - lo).clamp(min=1)
    stretched = torch.floor(d * scale + -lo * scale).clamp(0, 255).float()
    return torch.where(hi > lo, stretched, f)


def _equalize(xi: Tensor) -> Tensor:
    """PIL's ImageOps.equalize, per image and channel, through one 256-bin histogram each."""
    n, c, h, w = xi.shape
    pixels = xi.reshape(n * c, h * w)
    hist = torch.zeros(n * c, 256, dtype=torch.long, device=xi.device).scatter_add_(1, pixels, torch.ones_like(pixels))
    last = 255 - torch.argmax((hist.flip(1) > 0).long(), dim=1, keepdim=True)  # the highest value present
    step = (h * w - hist.gather(1, last)) // 255
    below = torch.cumsum(hist, 1) - hist  # pixels under each value
    lut = ((step // 2 + below) // step.clamp(min=1)).clamp(max=255)
    lut = torch.where(step > 0, lut, torch.arange(256, device=xi.device))  # one value, or too few: unchanged
    return lut.gather(1, pixels).view(n, c, h, w).float()
