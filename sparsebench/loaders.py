"""Batches streamed from a torch DataLoader: the path for data that does not fit in memory, and for
the Python API's loaders.

``Loader`` gives any iterable of ``(inputs, labels)`` batches (a DataLoader above all) the interface
the training loop reads from ``data.Batches``: ``len``, ``epoch(epoch, start)`` and ``device``.
``stream`` builds the DataLoader for a torch ``Dataset`` (workers, pinned memory, an order that depends
only on (seed, epoch), so a resumed run sees the batches it would have seen).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Tuple

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from sparsebench.data import crop_flip, cutout_keep, draw_crop_flip, draw_cutout


class EpochSampler(Sampler[int]):
    """Indices of a dataset in an order drawn from (seed, epoch), set by ``set_epoch`` before each epoch
    (DistributedSampler's protocol); ``skip`` leaves out the first indices of the epoch (a resume)."""

    def __init__(self, size: int, shuffle: bool, seed: int = 0):
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.skip, self.size))
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=g)[self.skip :].tolist())

    def __len__(self) -> int:
        return self.size - self.skip


def stream(
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    workers: int = 0,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader over ``dataset`` whose order ``Loader.epoch`` sets from (seed, epoch)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochSampler(len(dataset), shuffle, seed),
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        persistent_workers=workers > 0,
    )


@dataclass
class CropFlip:
    """``data.augment`` on streamed batches: the in-memory path's pad-4 crop, horizontal flip and cutout,
    applied to a whole batch on its device once the dataset's own transform has normalised it (the
    padding and the cutout square are 0 there: the mean colour). Each batch's draws depend only on
    (seed, epoch, batch), so a resumed run augments as it would have."""

    cutout: int = 0
    seed: int = 0

    def __call__(self, x: Tensor, epoch: int, batch: int) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"data.augment: crop and flip need N x C x H x W image batches, not {tuple(x.shape)}")
        n, _, h, w = x.shape
        g = torch.Generator().manual_seed((self.seed * 100_003 + epoch) * 1_000_003 + batch)
        draws = [t.to(x.device) for t in draw_crop_flip(n, g)]
        x = crop_flip(x, *draws)
        if self.cutout:
            keep = cutout_keep(x.shape, self.cutout, *(t.to(x.device) for t in draw_cutout(n, h, w, g)))
            x = x * keep.to(x.dtype)
        return x


class Loader:
    """Batches of ``source`` (a DataLoader, or any iterable of ``(inputs, labels)`` with a length) moved
    to ``device`` (channels_last there when asked, ``augment`` applied there), read the way the loop reads
    ``data.Batches``."""

    def __init__(
        self,
        source: Iterable,
        device: torch.device,
        channels_last: bool = False,
        augment: Optional[CropFlip] = None,
    ):
        if not hasattr(source, "__len__"):
            raise TypeError(f"{type(source).__name__}: the batches need a length (a DataLoader has one)")
        self.source, self.device, self.channels_last = source, torch.device(device), channels_last
        self.augment = augment

    def __len__(self) -> int:
        return len(self.source)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Tuple[Tensor, Tensor]]:
        """The batches of ``epoch`` from batch ``start`` on."""
        sampler = getattr(self.source, "sampler", None)
        skipped = 0
        if isinstance(sampler, EpochSampler):  # our stream: the sampler starts at the batch itself
            sampler.set_epoch(epoch, start * self.source.batch_size)
            skipped = start
        elif hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        for i, (x, y) in enumerate(self.source, start=skipped):
            if i < start:  # another loader: read and dropped, so the order stays its own
                continue
            yield self._to_device(x, epoch, i), y.to(self.device, non_blocking=True)

    def _to_device(self, x: Tensor, epoch: int, batch: int) -> Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.augment is not None:
            x = self.augment(x, epoch, batch)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def __iter__(self) -> Iterator[Tuple[Tensor, Tensor]]:
        return self.epoch(0)
