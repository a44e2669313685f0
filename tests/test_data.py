"""Data sources, the decode cache and the batch iterator."""

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sparsebench.data as data
from sparsebench.errors import ConfigError
from tests.conftest import compose


def load(*overrides: str) -> data.Dataset:
    return data.load_dataset(compose(*overrides).data)


def test_digits_is_embedded_and_split_fixed():
    ds = load("data=digits")
    assert ds.x_train.shape == (1437, 1, 8, 8) and ds.x_test.shape == (360, 1, 8, 8)
    assert ds.x_train.dtype == torch.uint8 and ds.num_classes == 10
    assert torch.equal(ds.y_test, load("data=digits", "seed=5").y_test)


def test_the_validation_split_is_held_out_per_class_and_the_same_for_every_run():
    ds = load("data=digits")
    split = data.hold_out(ds, 0.1)
    assert len(split.y_val) == sum(round(0.1 * int((ds.y_train == c).sum())) for c in range(10))
    assert len(split.y_train) + len(split.y_val) == len(ds.y_train)
    for c in range(10):  # stratified: every class gives its share
        assert abs(int((split.y_val == c).sum()) - 0.1 * int((ds.y_train == c).sum())) <= 0.5
    # Disjoint: together the two splits are the training set, image for image.
    both = torch.cat([split.x_train, split.x_val]).flatten(1)
    assert torch.equal(both.sort(0).values, ds.x_train.flatten(1).sort(0).values)
    assert torch.equal(data.hold_out(ds, 0.1).x_val, split.x_val)  # seeded: the same images again
    assert not torch.equal(data.hold_out(ds, 0.1, seed=1).x_val, split.x_val)
    assert data.hold_out(ds, 0.0) is ds
    tiny = data.Dataset("t", ds.x_train[:3], ds.y_train[:3], ds.x_test, ds.y_test, 10, ds.mean, ds.std)
    with pytest.raises(ConfigError, match=r"data.val_fraction=0.1 is not allowed for 3 training images"):
        data.hold_out(tiny, 0.1)


def test_keras_npz(tmp_path: Path):
    rng = np.random.default_rng(0)
    path = tmp_path / "mnist.npz"
    np.savez(
        path,
        x_train=rng.integers(0, 255, (20, 28, 28), dtype=np.uint8),
        y_train=np.arange(20) % 10,
        x_test=rng.integers(0, 255, (10, 28, 28), dtype=np.uint8),
        y_test=np.arange(10),
    )
    ds = load("data=mnist", f"data.path={path}")
    assert ds.x_train.shape == (20, 1, 28, 28) and ds.image_size == 28 and ds.in_channels == 1
    assert ds.y_test.tolist() == list(range(10))


def test_keras_npz_with_missing_arrays_is_refused(tmp_path: Path):
    path = tmp_path / "bad.npz"
    np.savez(path, x_train=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ConfigError, match="npz lacks y_train, x_test, y_test"):
        load("data=mnist", f"data.path={path}")


def make_image_zip(path: Path, classes=("cat", "dog"), per_class=3) -> None:
    with zipfile.ZipFile(path, "w") as z:
        for split in ("train", "test"):
            for ci, c in enumerate(classes):
                for i in range(per_class):
                    buf = io.BytesIO()
                    Image.fromarray(np.full((32, 32, 3), 40 * ci + i, np.uint8)).save(buf, format="PNG")
                    z.writestr(f"cifar/{split}/{c}/{i}.png", buf.getvalue())


def test_image_folder_zip_is_decoded_once_and_cached(tmp_path: Path, monkeypatch):
    make_image_zip(tmp_path / "imgs.zip")
    overrides = ["data=cifar10", f"data.path={tmp_path / 'imgs.zip'}", f"data.cache_dir={tmp_path / 'cache'}"]
    ds = load(*overrides)
    assert ds.x_train.shape == (6, 3, 32, 32) and ds.num_classes == 2
    assert ds.y_train.tolist() == [0, 0, 0, 1, 1, 1]
    assert int(ds.x_train[4, 0, 0, 0]) == 41  # dog image 1: 40 * 1 + 1
    assert len(list((tmp_path / "cache").glob("imgs-*.npz"))) == 1

    def no_decoding(_):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(data, "_image_folder", no_decoding)
    assert torch.equal(load(*overrides).x_train, ds.x_train)


def test_image_folder_directory(tmp_path: Path):
    make_image_zip(tmp_path / "imgs.zip", classes=("a", "b", "c"), per_class=2)
    zipfile.ZipFile(tmp_path / "imgs.zip").extractall(tmp_path / "tree")
    ds = load("data=cifar10", f"data.path={tmp_path / 'tree'}", f"data.cache_dir={tmp_path / 'cache'}")
    assert ds.x_test.shape == (6, 3, 32, 32) and ds.num_classes == 3


def test_missing_data_says_where_it_looked(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"data.path is not set and no mnist.npz was found \(looked in: "):
        load("data=mnist", f"data.cache_dir={tmp_path}")
    with pytest.raises(ConfigError, match="no such file or directory"):
        load("data=cifar10", f"data.path={tmp_path / 'nope.zip'}")


def test_synthetic_shape_and_learnable_labels():
    ds = load("data=synthetic", "data.shape=[3,16,16]", "data.train_size=100", "data.test_size=40")
    assert ds.x_train.shape == (100, 3, 16, 16) and ds.x_test.shape == (40, 3, 16, 16)
    # Class means differ, so per-class averages of the same class agree more than across classes.
    x, y = ds.x_train.float(), ds.y_train
    m0, m1 = x[y == y[0]].mean(0), x[y != y[0]].mean(0)
    assert (m0 - m1).abs().mean() > 10


def test_batches_are_normalised_and_resumable():
    ds = load("data=digits")
    batches = data.Batches(ds.x_train, ds.y_train, ds.mean, ds.std, 100, shuffle=True, augment=True, seed=3)
    full = list(batches.epoch(2))
    assert len(full) == len(batches) == 15 and full[-1][0].shape[0] == 37
    tail = list(batches.epoch(2, start=4))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[4:], tail))
    assert not torch.equal(full[0][1], list(batches.epoch(3))[0][1])  # a new order each epoch
    x = torch.cat([b[0] for b in data.Batches(ds.x_train, ds.y_train, ds.mean, ds.std, 500, shuffle=False)])
    assert x.mean().abs() < 0.05 and (x.std() - 1).abs() < 0.1


def test_batches_do_not_depend_on_how_the_epoch_is_chunked(monkeypatch):
    # Every image's random choices are drawn for the whole epoch first, so augmenting 100 images at
    # a time or one batch at a time gives the same batches, and a resumed epoch starts mid-chunk.
    ds = load("data=digits")
    make = lambda: data.Batches(
        ds.x_train,
        ds.y_train,
        ds.mean,
        ds.std,
        32,
        shuffle=True,
        augment=True,  # noqa: E731
        cutout=3,
        trivialaugment=True,
        seed=1,
        channels_last=True,
    )
    whole = list(make().epoch(4))
    monkeypatch.setattr(data.Batches, "CHUNK_VALUES", 100 * 64)  # 100 digit images: three batches a chunk
    chunked, resumed = list(make().epoch(4)), list(make().epoch(4, start=5))
    assert len(whole) == len(chunked) == 45 and whole[-1][0].shape[0] == 1437 - 44 * 32
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(whole, chunked))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(whole[5:], resumed))
    assert all(x.is_contiguous(memory_format=torch.channels_last) for x, _ in chunked)


def test_drop_last_leaves_out_the_short_batch_only():
    ds = load("data=digits")
    make = lambda n, **kw: data.Batches(
        ds.x_train[:n],
        ds.y_train[:n],
        ds.mean,
        ds.std,
        100,
        shuffle=True,  # noqa: E731
        seed=3,
        **kw,
    )
    kept, dropped = list(make(1437).epoch(0)), list(make(1437, drop_last=True).epoch(0))
    assert len(dropped) == len(make(1437, drop_last=True)) == 14 and all(len(y) == 100 for _, y in dropped)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(kept, dropped)) and len(kept[-1][1]) == 37
    assert [len(y) for _, y in make(60, drop_last=True).epoch(0)] == [60]  # a set smaller than a batch keeps it


def test_random_crop_flip_moves_pixels_but_keeps_shape():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.uint8).view(2, 1, 4, 4)
    g = torch.Generator().manual_seed(0)
    out = data.crop_flip(x, *data.draw_crop_flip(2, g, pad=0), pad=0)  # no padding: only flips are possible
    for i in range(2):
        assert torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(-1))
    out = data.crop_flip(x, *data.draw_crop_flip(2, torch.Generator().manual_seed(1), pad=2), pad=2)
    assert out.shape == x.shape and not torch.equal(out, x)


def test_cutout_zeroes_one_clipped_square_per_image():
    centres = data.draw_cutout(200, 32, 32, torch.Generator().manual_seed(0))
    mask = data.cutout_keep(torch.Size([200, 3, 32, 32]), 16, *centres)
    assert mask.shape == (200, 1, 32, 32)
    holes = (mask == 0).squeeze(1)
    rows, cols = holes.any(2).sum(1), holes.any(1).sum(1)
    assert torch.equal(holes.sum((1, 2)), rows * cols)  # one rectangle per image
    assert rows.max() == 16 and cols.max() == 16 and rows.min() >= 8 and cols.min() >= 8  # clipped at most to half
    assert (rows * cols < 256).any()  # some squares hang over the border


def test_cutout_batches_keep_the_order_and_blank_to_the_mean():
    ds = load("data=digits")
    plain = data.Batches(ds.x_train, ds.y_train, ds.mean, ds.std, 100, shuffle=True, augment=True, seed=3)
    cut = data.Batches(ds.x_train, ds.y_train, ds.mean, ds.std, 100, shuffle=True, augment=True, cutout=4, seed=3)
    (xp, yp), (xc, yc) = next(iter(plain.epoch(1))), next(iter(cut.epoch(1)))
    assert torch.equal(yp, yc)  # same images, same crops: cutout only blanks
    changed = xp != xc
    assert changed.any() and (xc[changed] == 0).all()
    per_image = changed.any(1).flatten(1).sum(1)
    assert per_image.max() <= 16


def test_cutout_without_augment_is_refused():
    from sparsebench.config import validate

    with pytest.raises(ValueError, match="data.cutout"):
        validate(compose("data=digits", "data.cutout=8"))


def test_cutout_larger_than_the_images_is_refused(tmp_path):
    from tests.conftest import DENSE, run_cli

    res = run_cli(*DENSE, "data=digits", "data.augment=true", "data.cutout=9", f"hydra.run.dir={tmp_path}")
    assert res.returncode != 0
    assert "data.cutout=9 is not allowed: at most the image side (8 here)" in res.stderr


def test_trivialaugment_batches_keep_the_order_and_are_reproducible():
    ds = load("data=digits")
    make = lambda **kw: data.Batches(
        ds.x_train, ds.y_train, ds.mean, ds.std, 100, shuffle=True, augment=True, seed=3, **kw
    )  # noqa: E731
    plain, ta = make(), make(trivialaugment=True)
    (xp, yp), (xt, yt) = next(iter(plain.epoch(1))), next(iter(ta.epoch(1)))
    assert torch.equal(yp, yt)  # same images in the same order
    assert (xp != xt).flatten(1).any(1).float().mean() > 0.5  # most images changed by their operation
    again = list(make(trivialaugment=True).epoch(1, start=2))  # a resumed run sees the same batches
    assert all(torch.equal(a[0], b[0]) for a, b in zip(list(ta.epoch(1))[2:], again))


def test_trivialaugment_without_augment_is_refused():
    from sparsebench.config import validate

    with pytest.raises(ValueError, match="data.trivialaugment"):
        validate(compose("data=digits", "data.trivialaugment=true"))
