"""Any model and any dataset in the app: model._target_, data.train/test streamed through DataLoaders."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from torch import nn

from sparsebench.errors import ConfigError
from sparsebench.experiment import run
from sparsebench.loaders import CropFlip, EpochSampler, Loader, stream
from tests.conftest import TINY, compose


class PatternImages(torch.utils.data.Dataset):
    """A user's Dataset: ``size`` 3x12x12 float images, each class a noisy copy of its own pattern;
    ``marked`` sets every image's first pixel to 100 (an evaluation transform a test can see)."""

    classes = ["a", "b", "c", "d"]

    def __init__(self, size: int, seed: int = 0, marked: bool = False):
        g = torch.Generator().manual_seed(seed)
        patterns = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(99))
        self.y = torch.randint(0, 4, (size,), generator=g)
        self.x = patterns[self.y] + 0.5 * torch.randn(size, 3, 12, 12, generator=g)
        if marked:
            self.x[:, 0, 0, 0] = 100.0

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])


class UserNet(nn.Module):
    """A user's network, built from its own arguments (not the registry's)."""

    def __init__(self, classes: int, hidden: int = 16):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, hidden, 3, padding=1),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.head(self.body(x))


USER = [
    "model.name=usernet",
    "model._target_=tests.test_streaming.UserNet",
    "++model.kwargs={classes:4,hidden:24}",
    "data.name=patterns",
    "data.train={_target_:tests.test_streaming.PatternImages,size:400,seed:0}",
    "data.test={_target_:tests.test_streaming.PatternImages,size:100,seed:1}",
    "data.workers=0",
]


def test_a_users_model_and_dataset_run_through_the_whole_pipeline(tmp_path: Path):
    cfg = compose(*TINY, *USER, "trainer.epochs=3", "trainer.finetune_epochs=2", "bench=quick", "data.augment=true")
    metrics = run(cfg, tmp_path)
    assert metrics["status"] == "ok" and metrics["val_size"] == 40  # a tenth of data.train held out
    assert metrics["acc_dense"] > 0.6 and metrics["acc_final"] > 0.5  # four patterns: learnt
    assert metrics["sparsity"] == pytest.approx(0.9, abs=1e-3)  # body.3 alone: first conv and head stay dense
    with open(tmp_path / "layers.csv") as f:
        layers = {r["layer"] for r in csv.DictReader(f)}
    assert layers == {"body.0", "body.3", "head"}  # the user's layer names
    assert metrics["network_export_error/b1"] < 1e-4  # the packed network is the trained one
    assert (tmp_path / "packed.safetensors").is_file()


def test_streamed_epochs_are_seeded_and_a_resume_starts_at_its_batch():
    data = PatternImages(50)
    batches = Loader(stream(data, 8, shuffle=True, seed=3), torch.device("cpu"))
    first, again = [y for _, y in batches.epoch(0)], [y for _, y in batches.epoch(0)]
    assert len(first) == len(batches) == 7 and all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(torch.cat(first), torch.cat([y for _, y in batches.epoch(1)]))
    resumed = [y for _, y in batches.epoch(0, start=4)]  # the sampler starts there: nothing read twice
    assert all(torch.equal(a, b) for a, b in zip(first[4:], resumed)) and len(resumed) == 3
    assert len(EpochSampler(50, shuffle=False)) == 50


def shifted_or_flipped(out: torch.Tensor, image: torch.Tensor, pad: int = 4) -> bool:
    """Whether ``out`` is ``image`` padded with zeros by ``pad``, cropped back to its size, maybe flipped."""
    padded = nn.functional.pad(image, (pad, pad, pad, pad))
    h, w = image.shape[-2:]
    crops = [padded[:, dy : dy + h, dx : dx + w] for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)]
    return any(torch.equal(out, c) or torch.equal(out, c.flip(-1)) for c in crops)


def test_streamed_augmentation_crops_flips_and_cuts_out_reproducibly():
    data = PatternImages(40)
    plain = [x for x, _ in Loader(stream(data, 8, shuffle=True, seed=3), torch.device("cpu")).epoch(2)]
    augmented = Loader(stream(data, 8, shuffle=True, seed=3), torch.device("cpu"), augment=CropFlip(seed=3))
    first = [x for x, _ in augmented.epoch(2)]
    assert all(shifted_or_flipped(o, i) for a, b in zip(first, plain) for o, i in zip(a, b))
    assert sum(not torch.equal(a, b) for a, b in zip(first, plain)) == len(plain)  # every batch is changed
    assert all(torch.equal(a, b) for a, b in zip(first[2:], [x for x, _ in augmented.epoch(2, start=2)]))
    in_order = Loader(stream(data, 8, shuffle=False), torch.device("cpu"), augment=CropFlip(seed=3))
    assert not torch.equal(next(in_order.epoch(0))[0], next(in_order.epoch(1))[0])  # the draws follow the epoch
    # Cutout blanks a square on top of the same crops: every zero stays, 3 x 4 x 4 more per image at most.
    cut = Loader(stream(data, 8, shuffle=True, seed=3), torch.device("cpu"), augment=CropFlip(cutout=4, seed=3))
    for a, b in zip(first, [x for x, _ in cut.epoch(2)]):
        assert ((b == 0) >= (a == 0)).all()
        assert ((b == 0).sum(dim=(1, 2, 3)) - (a == 0).sum(dim=(1, 2, 3))).max() <= 3 * 16
        assert (b == 0).sum() > (a == 0).sum()
    with pytest.raises(ValueError, match=r"data\.augment: crop and flip need N x C x H x W .*, not \(4, 10\)"):
        CropFlip()(torch.zeros(4, 10), 0, 0)


def test_data_val_needs_data_train_and_is_unused_without_a_validation_share(tmp_path: Path):
    from sparsebench.config import unused_settings, validate

    val = "data.val={_target_:tests.test_streaming.PatternImages,size:400}"
    with pytest.raises(ConfigError, match=r"data\.val is not allowed without data\.train: .*\(data\.val=null\)"):
        validate(compose(*TINY, val))
    cfg = compose(*TINY, *USER, val, "data.val_fraction=0")  # every image trains: data.val reads nothing
    validate(cfg)
    (note,) = unused_settings(cfg)
    assert note == "data.val is unused: data.val_fraction=0 holds no validation share out of data.train"


def test_the_validation_share_is_read_through_data_val(tmp_path: Path):
    from sparsebench.experiment import Job, stream_data

    marked = "data.val={_target_:tests.test_streaming.PatternImages,size:400,seed:0,marked:true}"
    job = Job(compose(*TINY, *USER, marked), tmp_path, None, torch.device("cpu"))
    stream_data(job)
    val = [x for x, _ in job.val.epoch(0)]
    assert sum(len(x) for x in val) == job.val_size == 40 and all((x[:, 0, 0, 0] == 100).all() for x in val)
    assert not any((x[:, 0, 0, 0] == 100).any() for x, _ in job.train.epoch(0))  # training reads data.train
    plain = Job(compose(*TINY, *USER), tmp_path, None, torch.device("cpu"))
    stream_data(plain)  # the same held-out items, unmarked
    assert all(torch.equal(a[:, 1:], b[:, 1:]) for a, b in zip(val, [x for x, _ in plain.val.epoch(0)]))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.train=null"], "data.train=None is not allowed: a Dataset (_target_) whenever the other one is given"),
        (["data.on_device=true"], "data.on_device=True is not allowed: false with data.train"),
        (["data.augment=true", "data.trivialaugment=true"], "data.trivialaugment=True is not allowed: false with "),
        (["data.augment=true", "data.cutout=13"], "data.cutout=13 is not allowed: at most the image side (12 here)"),
        (["data.workers=-1"], "data.workers=-1 is not allowed: an integer >= 0"),
        (["data.val={_target_:tests.test_streaming.PatternImages,size:9}"], "data.val: has 9 items and data.train 400"),
        (["data.test={_target_:tests.test_streaming.Missing}"], "data.test: could not build it ("),
        (["++model.kwargs={classes:4,depth:3}"], "model._target_: could not build it (TypeError: "),
    ],
)
def test_bad_user_data_settings_are_one_line(tmp_path: Path, overrides, message):
    with pytest.raises(ConfigError) as refused:
        run(compose(*TINY, *USER, "bench=none", *overrides), tmp_path)
    assert message in str(refused.value)


def test_torchvision_model_on_an_imagefolder_tree(tmp_path: Path):
    # The conf example end to end (experiment=imagefolder_resnet50's data and model), where torchvision is.
    pytest.importorskip("torchvision")
    from PIL import Image

    for split in ("train", "val"):
        for c, colour in enumerate(("red", "green", "blue")):
            folder = tmp_path / "tree" / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (40, 40), colour).save(folder / f"{i}.png")
    metrics = run(
        compose(
            *TINY,
            "experiment=imagefolder_resnet50",
            f"data.path={tmp_path / 'tree'}",
            "data.workers=0",
            "data.batch_size=4",
            "model._target_=torchvision.models.resnet18",
            "++model.kwargs={num_classes:3}",
            "trainer.epochs=1",
            "trainer.finetune_epochs=1",
            "bench=none",
        ),
        tmp_path / "run",
    )
    assert metrics["status"] == "ok" and metrics["val_size"] == 1
    assert (tmp_path / "run" / "packed.safetensors").is_file()
