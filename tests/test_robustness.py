"""Bad input and damaged files end in one line naming the key or file; nothing hostile runs.

Each class of problem: hostile pickles, damaged checkpoints and weight files, a resume that cannot
prove its config, damaged or ill-shaped data, unknown config keys, damaged packed files and run files.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsebench.config import unused_settings, validate
from sparsebench.errors import ConfigError
from sparsebench.experiment import run
from sparsebench.sparse.format import load_packed, save_packed
from sparsebench.sparse.synthetic import random_layer
from tests.conftest import DENSE, compose, run_cli

MARKER = "sparsebench-payload-ran"


class Payload:
    """Unpickling this runs a shell command: the file it is in must be refused, not loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def hostile_file(path: Path, marker: Path) -> Path:
    torch.save({"model": {"w": torch.zeros(1)}, "extra": Payload(marker)}, path)
    return path


@pytest.mark.parametrize("key", ["trainer.init_from", "trainer.teacher"])
def test_a_hostile_pickle_is_refused_and_never_runs(tmp_path: Path, key: str):
    marker = tmp_path / MARKER
    bad = hostile_file(tmp_path / "dense.pt", marker)
    extra = (
        ["prune=agp", "trainer.finetune_epochs=1", "prune.unit=epoch", "prune.end=1", "trainer.distill=0.5"]
        if "teacher" in key
        else []
    )
    cfg = compose(*DENSE, *extra, f"{key}={bad}")
    with pytest.raises(ConfigError, match=rf"{key}=.*holds more than tensors and plain containers"):
        run(cfg, tmp_path / "run")
    assert not marker.exists()


def test_a_hostile_checkpoint_is_refused_on_resume(tmp_path: Path):
    marker = tmp_path / MARKER
    run(compose(*DENSE), tmp_path / "run")
    hostile_file(tmp_path / "run" / "checkpoints" / "last.pt", marker)
    with pytest.raises(ConfigError, match="trainer.resume=true: .* holds more than tensors"):
        run(compose(*DENSE, "trainer.resume=true"), tmp_path / "run")
    assert not marker.exists()


DAMAGE = {
    "empty": lambda p: p.write_bytes(b""),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
    "random": lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)),
    "a tensor, not a dict": lambda p: torch.save(torch.zeros(3), p),
    "a dict without weights": lambda p: torch.save({"model": {"w": 1}}, p),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_weight_files_and_checkpoints_are_one_line(tmp_path: Path, damage: str):
    run(compose(*DENSE), tmp_path / "run")
    weights = tmp_path / "run" / "dense.pt"
    DAMAGE[damage](weights)
    with pytest.raises(ConfigError, match=r"trainer.init_from=.*dense\.pt"):
        run(compose(*DENSE, f"trainer.init_from={weights}"), tmp_path / "other")
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    DAMAGE[damage](last)
    with pytest.raises(ConfigError, match="trainer.resume=true: "):
        run(compose(*DENSE, "trainer.resume=true"), tmp_path / "run")


@pytest.mark.parametrize("manifest", ["missing", "unreadable", "without config"])
def test_resume_refuses_when_the_config_it_ran_with_is_unknown(tmp_path: Path, manifest: str):
    cut = [*DENSE, "trainer.epochs=2"]
    run(compose(*cut), tmp_path)
    path = tmp_path / "manifest.json"
    if manifest == "missing":
        path.unlink()
    else:
        path.write_text("{half a manifest" if manifest == "unreadable" else '{"seed": 0}')
    done = run_cli(*cut, f"hydra.run.dir={tmp_path}", "trainer.resume=true", "trainer.lr=0.1")
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "trainer.resume=true" in lines[0] and "Traceback" not in done.stderr


def npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def images(n: int, shape=(28, 28)) -> np.ndarray:
    return np.zeros((n, *shape), dtype=np.uint8)


def bad_data_files(tmp_path: Path):
    """(what, file) pairs: each a data.path for data=mnist that must be refused in one line."""
    ok = dict(x_train=images(4), y_train=np.arange(4), x_test=images(2), y_test=np.arange(2))
    yield "truncated npz", tmp_path / "t.npz"
    data = npz(tmp_path / "full.npz", **ok).read_bytes()
    (tmp_path / "t.npz").write_bytes(data[: len(data) // 2])
    yield "labels of another length", npz(tmp_path / "len.npz", **{**ok, "y_train": np.arange(3)})
    yield "images of no image shape", npz(tmp_path / "shape.npz", **{**ok, "x_train": np.zeros(4, np.uint8)})
    yield "other test image size", npz(tmp_path / "size.npz", **{**ok, "x_test": images(2, (14, 14))})
    yield "pickled objects", npz(tmp_path / "obj.npz", **{**ok, "y_test": np.array([object(), object()])})
    yield "not a zip", tmp_path / "plain.bin"
    (tmp_path / "plain.bin").write_bytes(b"not an archive")
    folder = tmp_path / "folder"
    for split in ("train", "test"):
        (folder / split / "a").mkdir(parents=True)
        (folder / split / "a" / "1.txt").write_text("not an image")
    yield "a non-image file in an ImageFolder", folder
    archive = tmp_path / "folder.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("train/a/1.png", b"garbage")
        z.writestr("test/a/1.png", b"garbage")
    yield "a non-image file in a zip", archive


def test_bad_data_is_one_line_naming_data_path(tmp_path: Path):
    from sparsebench.data import load_dataset

    for what, path in bad_data_files(tmp_path):
        cfg = compose(*DENSE, "data=mnist", f"data.path={path}", f"data.cache_dir={tmp_path / 'cache'}")
        with pytest.raises(ConfigError, match=r"^data\.path=") as e:
            load_dataset(cfg.data)
        assert "\n" not in str(e.value), what


def test_a_data_path_the_dataset_does_not_read_or_an_empty_one_is_refused():
    with pytest.raises(ConfigError, match="data.path='x.npz' is not allowed: null for data=digits"):
        validate(compose(*DENSE, "data.path=x.npz"), ["data.path=x.npz"])
    assert unused_settings(compose(*DENSE, "data.path=x.npz"))[0].startswith("data.path='x.npz' is unused")
    with pytest.raises(ConfigError, match="data.path='' is not allowed: null or a file or folder"):
        validate(compose(*DENSE, "data=mnist", "data.path=''"))


@pytest.mark.parametrize("override", ["+foo=1", "+trainer.epoch=5", "++trainer.epoch=5", "++data.sizes=3"])
def test_unknown_keys_are_refused_even_with_plus(override: str):
    with pytest.raises(ConfigError, match="not a key of the config"):
        validate(compose(*DENSE, override))
    validate(compose(*DENSE, "prune=agp", "++prune.overrides={conv1:0.5}"))  # an open mapping: any layer name


def test_settings_a_method_does_not_read_are_named():
    assert unused_settings(compose("prune=none", "prune.final_sparsity=0.9")) == [
        "prune.final_sparsity=0.9 is unused: prune=none prunes nothing"
    ]
    assert unused_settings(compose("prune=none", "quant=none", "trainer.distill=1.0"))[-1].startswith(
        "trainer.distill=1.0 is unused"
    )
    assert unused_settings(compose("prune=agp", "quant=linear")) == []


def test_an_edited_packed_header_fails_its_checksum(tmp_path: Path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = tmp_path / "p.safetensors"
    save_packed(path, {"conv": random_layer((8, 4, 3, 3), 0.5, padding=1, seed=1)})
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    index = json.loads(meta["layers"])
    index["conv"]["padding"] = 0  # what the layer computes changes; its tensors do not
    save_file(tensors, str(tmp_path / "edited.safetensors"), metadata={**meta, "layers": json.dumps(index)})
    with pytest.raises(ValueError, match="geometry .* fails its checksum"):
        load_packed(tmp_path / "edited.safetensors")
    del index["conv"]["sha256"]
    save_file(tensors, str(tmp_path / "damaged.safetensors"), metadata={**meta, "layers": json.dumps(index)})
    with pytest.raises(ValueError, match="metadata is damaged|fails its checksum"):
        load_packed(tmp_path / "damaged.safetensors")


def test_the_report_calls_a_truncated_metrics_file_unreadable(tmp_path: Path):
    from sparsebench.report import read_job

    run(compose(*DENSE), tmp_path / "job")
    (tmp_path / "job" / "metrics.json").write_text('{"status": "ok", "acc_fi')
    row = read_job(tmp_path / "job")
    assert row["status"] == "failed" and row["error"].startswith("unreadable metrics.json")


def test_a_run_directory_that_cannot_be_created_is_one_line(tmp_path: Path):
    (tmp_path / "file").write_text("")
    done = run_cli(*DENSE, f"hydra.run.dir={tmp_path / 'file' / 'run'}")
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"error: hydra.run.dir={tmp_path / 'file' / 'run'}: cannot create it ({tmp_path / 'file'} is not a folder)"
    ]


def test_a_resumed_run_continues_its_wandb_run(tmp_path: Path):
    pytest.importorskip("wandb")
    overrides = [*DENSE, "trainer.epochs=2", "logger=wandb", "logger.mode=offline"]
    run(compose(*overrides), tmp_path)
    first = (tmp_path / "wandb-id.txt").read_text().strip()
    run(compose(*overrides, "trainer.resume=true"), tmp_path)
    assert (tmp_path / "wandb-id.txt").read_text().strip() == first
    runs = sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
    # One folder per launch (one W&B version shares it, another adds "-1" within the same second): the run's id.
    assert 1 <= len(runs) <= 2 and all(re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{first}(-\d+)?", n) for n in runs)


def test_a_pickle_payload_class_really_runs_when_unpickled(tmp_path: Path):
    # The guard above is only as good as the payload: unpickled without weights_only, it does run.
    marker = tmp_path / MARKER
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


def test_result_files_reach_the_disk_before_they_replace_the_old_ones(tmp_path: Path, monkeypatch):
    from sparsebench import rundir

    synced = []
    real = os.fsync
    monkeypatch.setattr(rundir.os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    rundir.write_json(tmp_path / "metrics.json", {"status": "ok"})
    assert len(synced) == 2  # the file's bytes, then the folder's rename
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"status": "ok"}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary file left


def test_a_layer_without_channels_is_refused_when_packed():
    from sparsebench.sparse.format import pack_weight

    with pytest.raises(ValueError, match="weight: shape .* has an empty dimension"):
        pack_weight(torch.zeros(4, 0, 3, 3))


def test_a_damaged_history_file_costs_the_report_only_its_curves(tmp_path: Path):
    from sparsebench.report import read_curves

    (tmp_path / "history.jsonl").write_bytes(b'{"dense/epoch": 1, "dense/acc": 0.5}\n3\n\xff\xfe{"cut\n')
    assert read_curves(tmp_path) == {"dense": [(1.0, 0.5)]}
