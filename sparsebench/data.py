"""Datasets as in-memory uint8 tensors, and a mini-batch iterator over them.

Every source (scikit-learn's digits, a Keras-style npz, an ImageFolder tree or zip of one,
a torchvision download, synthetic tensors) is decoded once to uint8 NCHW arrays; decoded
files are cached under ``data.cache_dir`` keyed by a hash of the source's content. Batches
are cut from the tensors directly (no DataLoader workers), on the CPU or on the GPU when
``data.on_device`` keeps the whole set there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from sparsebench.augment import trivial_augment
from sparsebench.errors import ConfigError

if TYPE_CHECKING:  # annotations only: no import at run time
    from sparsebench.config import DataConfig

Arrays = Dict[str, np.ndarray]  # x_train, y_train, x_test, y_test (x: uint8 NCHW, y: int64)


@dataclass
class Dataset:
    name: str
    x_train: Tensor  # uint8, N x C x H x W
    y_train: Tensor  # int64
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    mean: Tensor  # per channel, in [0, 1] units
    std: Tensor
    x_val: Optional[Tensor] = None  # held out of x_train (data.val_fraction): what a run's choices read
    y_val: Optional[Tensor] = None

    @property
    def in_channels(self) -> int:
        return self.x_train.shape[1]

    @property
    def image_size(self) -> int:
        return self.x_train.shape[2]

    def to(self, device: torch.device) -> "Dataset":
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=True)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return dataclasses.replace(self, **moved)


def hold_out(data: Dataset, fraction: float, seed: int = 0) -> Dataset:
    """``data`` with ``fraction`` of its training images moved to a validation split, the same share of
    every class. The split depends on ``seed`` alone (not on the run's seed), so runs that differ in
    seed or recipe are scored on the same held-out images. ``fraction`` 0: no split."""
    if fraction <= 0:
        return data
    g = torch.Generator().manual_seed(seed)
    labels = data.y_train.cpu()
    val = []
    for c in labels.unique():
        members = (labels == c).nonzero().flatten()
        take = int(round(fraction * len(members)))
        val.append(members[torch.randperm(len(members), generator=g)[:take]])
    val = torch.cat(val).sort().values
    if len(val) == 0 or len(val) == len(labels):
        raise ConfigError(
            f"data.val_fraction={fraction} is not allowed for {len(labels)} training images: it leaves "
            f"{len(labels) - len(val)} to train on and {len(val)} to validate on (both must be >= 1)"
        )
    train = torch.ones(len(labels), dtype=torch.bool)
    train[val] = False
    on = data.x_train.device
    return dataclasses.replace(
        data,
        x_train=data.x_train[train.to(on)],
        y_train=data.y_train[train.to(on)],
        x_val=data.x_train[val.to(on)],
        y_val=data.y_train[val.to(on)],
    )


# ---------------------------------------------------------------- loading


def load_dataset(cfg: DataConfig) -> Dataset:
    """Build the dataset named by ``cfg.name`` (a DataConfig)."""
    if cfg.name == "digits":
        arrays = _digits(cfg.test_fraction, Path(os.path.expanduser(cfg.cache_dir)))
    elif cfg.name == "synthetic":
        arrays = _synthetic(list(cfg.shape), cfg.num_classes, cfg.train_size, cfg.test_size)
    else:
        arrays = _load_real(cfg.name, cfg.path, cfg.download, Path(os.path.expanduser(cfg.cache_dir)))
    return _to_dataset(cfg.name, arrays)


def _to_dataset(name: str, a: Arrays) -> Dataset:
    x_train = torch.from_numpy(np.ascontiguousarray(a["x_train"]))
    as_float = x_train.float() / 255.0
    mean = as_float.mean(dim=(0, 2, 3))
    std = as_float.std(dim=(0, 2, 3)).clamp_min(1e-3)
    y_train = torch.from_numpy(a["y_train"].astype(np.int64))
    y_test = torch.from_numpy(a["y_test"].astype(np.int64))
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    return Dataset(
        name, x_train, y_train, torch.from_numpy(np.ascontiguousarray(a["x_test"])), y_test, num_classes, mean, std
    )


def _digits(test_fraction: float, cache_dir: Path) -> Arrays:
    """The digits split, decoded once per scikit-learn version and kept in the cache (importing
    scikit-learn costs a fresh process seconds; the cached split is the same arrays)."""
    from importlib.metadata import version  # late, as scikit-learn below: only the digits source asks

    cached = cache_dir / f"digits-sklearn{version('scikit-learn')}-test{test_fraction:g}.npz"
    return _read_or_decode(cached, lambda: _split_digits(test_fraction))


def _split_digits(test_fraction: float) -> Arrays:
    from sklearn.datasets import load_digits  # late: a second-scale import, needed once per cache
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # Pixel values are 0..16; spread them over the uint8 range like every other source.
    images = np.clip(digits.images * 16, 0, 255).astype(np.uint8)[:, None]
    # A fixed split (seed 0), so test accuracy is comparable across runs and seeds.
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=test_fraction, random_state=0, stratify=digits.target
    )
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def _synthetic(shape: List[int], num_classes: int, train_size: int, test_size: int) -> Arrays:
    # Each class has its own random mean image, so a model can learn something.
    rng = np.random.default_rng(0)
    means = rng.uniform(64, 192, size=(num_classes, *shape))

    def draw(n: int) -> Tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, num_classes, size=n)
        x = means[y] + rng.normal(0, 48, size=(n, *shape))
        return np.clip(x, 0, 255).astype(np.uint8), y

    x_train, y_train = draw(train_size)
    x_test, y_test = draw(test_size)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def _load_real(name: str, path: Optional[str], download: bool, cache_dir: Path) -> Arrays:
    if path is None:
        if download:
            return _torchvision(name, cache_dir)
        candidates = [cache_dir / f"{name}.npz", Path("data") / f"{name}.npz"]
        found = next((c for c in candidates if c.exists()), None)
        if found is None:
            raise ConfigError(
                f"data.path is not set and no {name}.npz was found (looked in: "
                f"{', '.join(str(c) for c in candidates)}); set data.path to a Keras-style npz "
                f"(x_train, y_train, x_test, y_test), an ImageFolder directory or a zip of one "
                f"(train/<class>/*.png|jpg, test/<class>/...), or data.download=true (needs torchvision)"
            )
        path = str(found)
    source = Path(os.path.expanduser(path))
    if not source.exists():
        raise ConfigError(
            f"data.path={path!r}: no such file or directory; give a Keras-style npz, an ImageFolder "
            f"directory or a zip of one, or set data.download=true (needs torchvision)"
        )
    if source.suffix == ".npz":
        return _npz(source)
    if source.is_file() and not zipfile.is_zipfile(source):
        raise ConfigError(
            f"data.path={path!r}: not an npz, a zip or a folder; give a Keras-style npz, an ImageFolder "
            "directory (train/<class>/<image>, test/<class>/<image>) or a zip of one"
        )
    return _cached(source, cache_dir, lambda: _image_folder(source))


def _npz(path: Path) -> Arrays:
    key = f"data.path={str(path)!r}"
    try:
        with np.load(path) as f:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in f]
            if missing:
                raise ConfigError(
                    f"{key}: npz lacks {', '.join(missing)} (a Keras-style npz has x_train, y_train, x_test, y_test)"
                )
            arrays = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except ConfigError:
        raise
    except ValueError as e:  # numpy refuses object arrays: they would need unpickling
        raise ConfigError(
            f"{key}: not an npz of plain arrays ({_first_line(e)}); give x_train, y_train, x_test, "
            "y_test as numeric arrays"
        ) from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise ConfigError(
            f"{key}: not a readable npz file (empty, truncated or another format: {_first_line(e)})"
        ) from None
    _check_arrays(arrays, key)
    return {k: _to_nchw(v) if k.startswith("x") else v for k, v in arrays.items()}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:160]


def _check_arrays(a: Arrays, key: str) -> None:
    """Images N x H x W or N x H x W x C / N x C x H x W with N labels each, one image size, integer labels."""
    for split in ("train", "test"):
        x, y = a[f"x_{split}"], a[f"y_{split}"]
        if x.ndim not in (3, 4) or x.shape[0] == 0 or min(x.shape) < 1:
            raise ConfigError(
                f"{key}: x_{split} has shape {x.shape}; expected N x H x W or N x H x W x C images, N >= 1"
            )
        if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
            raise ConfigError(f"{key}: x_{split} holds {x.dtype}; expected uint8 or float pixels")
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise ConfigError(f"{key}: y_{split} has shape {y.shape}; expected one label per image ({x.shape[0]},)")
        if not np.issubdtype(y.dtype, np.integer) or (y.size and int(y.min()) < 0):
            raise ConfigError(f"{key}: y_{split} must hold class indices (integers >= 0), got {y.dtype}")
    if _to_nchw_shape(a["x_train"]) != _to_nchw_shape(a["x_test"]):
        raise ConfigError(
            f"{key}: train images are {a['x_train'].shape[1:]}, test images {a['x_test'].shape[1:]}; "
            "expected one image size"
        )


def _to_nchw_shape(x: np.ndarray) -> tuple:
    return _to_nchw(x[:1]).shape[1:]


def _to_nchw(x: np.ndarray) -> np.ndarray:
    """Keras layouts are N x H x W (grey) or N x H x W x C; we keep uint8 N x C x H x W."""
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    if x.dtype != np.uint8:
        x = np.clip(x * 255 if x.max() <= 1.0 else x, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(x)


def _content_hash(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def _cached(source: Path, cache_dir: Path, decode: Callable[[], Arrays]) -> Arrays:
    """Decode once; later runs (and epochs) read the uint8 arrays from the cache."""
    return _read_or_decode(cache_dir / f"{source.stem}-{_content_hash(source)}.npz", decode)


def _read_or_decode(cached: Path, decode: Callable[[], Arrays]) -> Arrays:
    """The arrays of the npz file ``cached``, or, when it is missing or damaged, ``decode()``'s, written
    there atomically for the next run."""
    try:
        with np.load(cached) as f:
            arrays = {k: f[k] for k in f.files}
        if {"x_train", "y_train", "x_test", "y_test"} <= set(arrays):
            return arrays
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        pass  # not cached yet, or damaged: decode again and replace it
    arrays = decode()
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=cached.parent, suffix=".npz", delete=False) as tmp:
        np.savez(tmp, **arrays)
    os.replace(tmp.name, cached)
    return arrays


def _image_folder(source: Path) -> Arrays:
    """``train/<class>/*`` and ``test/<class>/*`` from a directory or a zip of one."""
    from PIL import Image  # late: only an image-folder source needs Pillow

    if source.is_dir():
        entries = [(p.relative_to(source).as_posix(), p) for p in source.rglob("*") if p.is_file()]
        read = lambda item: item.read_bytes()  # noqa: E731
    else:
        archive = zipfile.ZipFile(source)
        entries = [(n, n) for n in archive.namelist() if not n.endswith("/")]
        read = archive.read
    # Tolerate one wrapping folder (cifar10/train/cat/1.jpg).
    split_files: Dict[str, List[Tuple[str, Any]]] = {"train": [], "test": []}
    for rel, handle in entries:
        parts = rel.split("/")
        for i, part in enumerate(parts[:-2]):
            if part in split_files and len(parts) - i == 3:
                split_files[part].append((parts[i + 1], handle))
    if not split_files["train"] or not split_files["test"]:
        raise ConfigError(
            f"data.path={str(source)!r}: expected an ImageFolder layout train/<class>/<image> and test/<class>/<image>"
        )
    classes = sorted({c for c, _ in split_files["train"]})
    index = {c: i for i, c in enumerate(classes)}
    out: Arrays = {}
    for split, files in split_files.items():
        files.sort(key=lambda item: (item[0], str(item[1])))
        images = [_read_image(Image, read, h, source) for _, h in files]
        sizes = {im.shape for im in images}
        if len(sizes) > 1:
            raise ConfigError(
                f"data.path={str(source)!r}: {split} images of {len(sizes)} sizes "
                f"({', '.join(str(s) for s in sorted(sizes)[:3])}); expected one size"
            )
        out[f"x_{split}"] = _to_nchw(np.stack(images))
        missing = sorted({c for c, _ in files} - set(index))
        if missing:
            raise ConfigError(f"data.path={str(source)!r}: test classes {missing[:3]} have no training images")
        out[f"y_{split}"] = np.array([index[c] for c, _ in files], dtype=np.int64)
    return out


def _read_image(image_module: Any, read: Any, handle: Any, source: Path) -> np.ndarray:
    """One image file as an array; a file PIL cannot read is named in one line."""
    try:
        return np.asarray(image_module.open(io.BytesIO(read(handle))))
    except Exception as e:  # PIL raises several error types for what is not an image
        raise ConfigError(
            f"data.path={str(source)!r}: {handle} is not an image PIL can read ({_first_line(e)})"
        ) from None


def _torchvision(name: str, cache_dir: Path) -> Arrays:
    try:
        import torchvision  # optional: only data.download=true needs it
    except ImportError:
        raise ConfigError("data.download=true needs torchvision (pip install torchvision), or give data.path") from None
    cls = {"mnist": torchvision.datasets.MNIST, "cifar10": torchvision.datasets.CIFAR10}[name]
    out: Arrays = {}
    for split, train in (("train", True), ("test", False)):
        ds = cls(root=str(cache_dir), train=train, download=True)
        out[f"x_{split}"] = _to_nchw(np.asarray(ds.data))
        out[f"y_{split}"] = np.asarray(ds.targets, dtype=np.int64)
    return out


# ---------------------------------------------------------------- batches


class Batches:
    """Mini-batches over in-memory uint8 tensors, augmented and normalised on the fly.

    The order and augmentation of an epoch depend only on (seed, epoch), so a resumed run
    can jump into the middle of an epoch and see exactly the batches it would have seen.
    Each image's random choices are drawn for the whole epoch at its start, and the images go
    through the augmentation and normalisation a chunk of batches at a time (the batches are
    views into their chunk), so the few dozen tiny kernels of the pipeline are launched once a
    chunk, not on every step of a host-bound CUDA-graph training loop. ``drop_last`` leaves out
    the epoch's last, short batch, so a model compiled for static shapes needs one graph, not two.
    """

    CHUNK_VALUES = 8192 * 3 * 32 * 32  # pixel values augmented at once (whole batches, at least one): 100 MB of float32

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        mean: Tensor,
        std: Tensor,
        batch_size: int,
        *,
        shuffle: bool,
        augment: bool = False,
        cutout: int = 0,
        trivialaugment: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        device: torch.device = torch.device("cpu"),
        channels_last: bool = False,
    ):
        self.x, self.y = x, y
        self.mean = mean.view(1, -1, 1, 1).to(device)
        self.std = std.view(1, -1, 1, 1).to(device)
        self.batch_size, self.shuffle, self.augment, self.cutout, self.seed = batch_size, shuffle, augment, cutout, seed
        self.trivialaugment, self.drop_last = trivialaugment, drop_last
        self.device, self.channels_last = device, channels_last

    def __len__(self) -> int:
        n = len(self.y)  # a set smaller than one batch keeps its one batch
        return n // self.batch_size if self.drop_last and n >= self.batch_size else -(-n // self.batch_size)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Tuple[Tensor, Tensor]]:
        g = torch.Generator(device=self.x.device).manual_seed(self.seed * 100_003 + epoch)
        n, bs = len(self.y), self.batch_size
        order = torch.randperm(n, generator=g, device=self.x.device) if self.shuffle else None
        crops = draw_crop_flip(n, g) if self.augment else None
        holes = draw_cutout(n, *self.x.shape[-2:], g) if self.augment and self.cutout else None
        # TrivialAugment comes first, as in the paper's CIFAR pipeline (then crop, flip, cutout), over
        # the whole epoch at once.
        x = (
            trivial_augment(self.x if order is None else self.x[order], g)
            if self.augment and self.trivialaugment
            else None
        )
        per_chunk = max(1, self.CHUNK_VALUES // (bs * self.x[0].numel()))  # 32 batches of 256 CIFAR images
        for first in range(start, len(self), per_chunk):
            last = min(len(self), first + per_chunk)
            lo, hi = first * bs, min(n, last * bs)
            idx = slice(lo, hi) if order is None else order[lo:hi]
            xs = x[lo:hi] if x is not None else self.x[idx]
            if crops is not None:
                xs = crop_flip(xs, *(c[lo:hi] for c in crops))
            xs = xs.to(self.device, non_blocking=True)
            if self.channels_last:  # in uint8, and float() keeps the layout; a batch sliced from it stays channels_last
                xs = xs.contiguous(memory_format=torch.channels_last)
            xs = xs.float().div_(255).sub_(self.mean).div_(self.std)
            if holes is not None:
                keep = cutout_keep(xs.shape, self.cutout, *(c[lo:hi].to(self.device) for c in holes))
                xs.mul_(keep)  # 0 after normalising: the mean colour
            ys = self.y[idx].to(self.device, non_blocking=True)
            for b in range(first, last):
                i, j = (b - first) * bs, min(hi - lo, (b - first + 1) * bs)
                yield xs[i:j], ys[i:j]

    def __iter__(self) -> Iterator[Tuple[Tensor, Tensor]]:
        return self.epoch(0)


def draw_crop_flip(n: int, g: torch.Generator, pad: int = 4) -> Tuple[Tensor, Tensor, Tensor]:
    """Per image: the crop's row and column offsets into the padded image, and whether it flips."""
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g, device=g.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g, device=g.device)
    return dy, dx, torch.rand(n, generator=g, device=g.device) < 0.5


def crop_flip(x: Tensor, dy: Tensor, dx: Tensor, flip: Tensor, pad: int = 4) -> Tensor:
    """The standard CIFAR augmentation, vectorised over the batch: pad-and-crop + h-flip."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = dy[:, None] + torch.arange(h, device=x.device)
    cols = dx[:, None] + torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=x.device)[:, None, None]
    # Advanced indices around a slice put the indexed dims first: N x H x W x C.
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def draw_cutout(n: int, h: int, w: int, g: torch.Generator) -> Tuple[Tensor, Tensor]:
    """Per image: the row and column of its cutout square's centre (anywhere in the image)."""
    return (
        torch.randint(0, h, (n,), generator=g, device=g.device),
        torch.randint(0, w, (n,), generator=g, device=g.device),
    )


def cutout_keep(shape: torch.Size, size: int, cy: Tensor, cx: Tensor) -> Tensor:
    """N x 1 x H x W float mask, 0 on one size x size square per image (clipped at the border)."""
    n, _, h, w = shape
    ys = torch.arange(h, device=cy.device) - cy[:, None] + size // 2  # inside when 0 <= ys < size
    xs = torch.arange(w, device=cx.device) - cx[:, None] + size // 2
    inside = ((ys >= 0) & (ys < size))[:, :, None] & ((xs >= 0) & (xs < size))[:, None, :]
    return (~inside).float()[:, None]
