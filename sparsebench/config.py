"""Typed configuration schema (Hydra ConfigStore) and value validation.

OmegaConf checks types while Hydra composes the config (``trainer.lr=abc`` fails there);
``validate`` checks ranges and cross-field rules before any work starts, and raises
``ConfigError`` with one line naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from sparsebench.bench.config import BackendConfig, BenchConfig, validate_bench
from sparsebench.errors import ConfigError
from sparsebench.errors import require as _require
from sparsebench.prune.config import PruneConfig, validate_prune
from sparsebench.quant.config import QuantConfig, validate_quant

# The config groups' folder: installed wheels carry it inside the package, a source checkout at the top.
_PACKAGE = Path(__file__).resolve().parent
CONF_DIR = str(next((p for p in (_PACKAGE / "conf", _PACKAGE.parent / "conf") if p.is_dir()), _PACKAGE / "conf"))


@dataclass
class DataConfig:
    name: str = MISSING  # digits | mnist | cifar10 | synthetic; with data.train: any label
    path: Optional[str] = None  # npz file, ImageFolder directory or zip of one
    download: bool = False  # torchvision download into cache_dir when no path is given
    cache_dir: str = "~/.cache/sparsebench"
    batch_size: int = 64
    eval_batch_size: int = 1000
    augment: bool = False  # random crop (pad 4) + horizontal flip, for CIFAR
    # With augment: zero a random square of this side per training image (DeVries & Taylor 2017); 0: off.
    cutout: int = 0
    # With augment: one of 14 image operations per training image at a random strength (Müller & Hutter 2021).
    trivialaugment: bool = False
    on_device: bool = False  # keep the whole decoded dataset on the training device
    # Training leaves out each epoch's last, short batch (a compiled model then needs one graph, not two).
    drop_last: bool = False
    test_fraction: float = 0.2  # digits only: held-out share
    # Share of the training images held out (stratified, the same images for every seed) as the validation
    # split: per-epoch scores and every choice a run makes (the sensitivity tolerance) read it; the test
    # set is scored at the end of each phase. 0: no split (per-epoch scores then read the test set).
    val_fraction: float = 0.1
    # Any torch Dataset instead of the built-in sources: `_target_` nodes that Hydra instantiates (e.g.
    # torchvision.datasets.ImageFolder with its transform; conf/data/imagefolder.yaml), streamed through a
    # DataLoader (workers, pinned memory) rather than decoded into memory. Augmentation is the dataset's
    # transform's, and data.augment's crop and flip on the device.
    train: Optional[Any] = None
    test: Optional[Any] = None
    # The same items as data.train read with evaluation transforms (no random crop): the validation share
    # is taken from it, so it is scored as the test set is. null: from data.train itself.
    val: Optional[Any] = None
    workers: int = 4  # DataLoader worker processes for data.train/test
    # synthetic only
    shape: List[int] = field(default_factory=lambda: [3, 32, 32])
    num_classes: int = 10
    train_size: int = 512
    test_size: int = 256


@dataclass
class ModelConfig:
    name: str = MISSING  # convnet | lenet5 | vgg16 | resnet18 | resnet20 | resnet56; with _target_: any label
    width: float = 1.0  # channel multiplier, so tests can stay tiny (the registry's models)
    # Any importable model factory or class instead of the registry (model._target_=torchvision.models.resnet50),
    # called with model.kwargs (e.g. {num_classes: 10}); pretrained weights through its own kwargs or
    # trainer.init_from, and trainer.epochs=0 to skip dense training.
    _target_: Optional[str] = None
    kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainerConfig:
    epochs: int = 10  # dense (pre-)training epochs; skipped with init_from
    finetune_epochs: int = 10  # retraining epochs while pruning / QAT run (only when one is on)
    optimizer: str = "sgd"  # sgd | adam
    lr: float = 0.05
    finetune_lr: Optional[float] = None  # None: same as lr
    momentum: float = 0.9
    weight_decay: float = 5e-4
    scheduler: str = "cosine"  # cosine | step | constant
    step_gamma: float = 0.1  # step scheduler: multiply by gamma at 50% and 75% of training
    label_smoothing: float = 0.0
    ema_decay: Optional[float] = None  # dense training ends with a moving average of its weights (e.g. 0.9995)
    # Retraining: weight of the teacher's softened outputs in the loss (trainer.teacher, else init_from's or this
    # run's dense.pt); 0: off.
    distill: float = 0.0
    distill_temperature: float = 4.0
    # With distill: another run's dense.pt to learn from (any network on the same data); None: this job's own.
    teacher: Optional[str] = None
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # bf16 autocast, on CUDA only
    channels_last: bool = True  # on CUDA only
    deterministic: bool = False
    init_from: Optional[str] = None  # checkpoint or dense.pt to start from (skips dense training)
    resume: bool = False  # continue from <run_dir>/checkpoints/last.pt
    checkpoint_every: int = 0  # steps between checkpoints; 0: at epoch ends only (checkpoint_epochs)
    checkpoint_epochs: int = 1  # a checkpoint at the end of every N-th epoch and the last one
    eval_every: int = 1  # test accuracy at the end of every N-th epoch and the last one
    progress: bool = True
    compile: bool = False  # torch.compile the model for training
    compile_mode: str = "default"  # torch.compile's mode; reduce-overhead replays the step as CUDA graphs
    # torch threads on a CPU run (small CNNs: 1 is as fast and robust to a busy host); null: torch's default.
    cpu_threads: Optional[int] = 1


@dataclass
class LoggerConfig:
    name: str = "none"  # wandb | none
    project: str = "sparsebench"
    entity: Optional[str] = None
    mode: str = "offline"  # offline | online | disabled
    group: Optional[str] = None
    job_type: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    artifacts: bool = True  # the packed file and the dense weights as W&B model artifacts


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    name: str = "default"
    seed: int = 0


def register_schema() -> None:
    ConfigStore.instance().store(name="schema", node=Config)


DATASETS = ("digits", "mnist", "cifar10", "synthetic")
PATH_DATASETS = ("mnist", "cifar10")  # the datasets read from data.path
CHOICES: Dict[str, tuple] = {
    "data.name": DATASETS,
    "trainer.optimizer": ("sgd", "adam"),
    "trainer.scheduler": ("cosine", "step", "constant"),
    "trainer.compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    "trainer.device": ("auto", "cpu", "cuda"),
    "logger.name": ("wandb", "none"),
    "logger.mode": ("offline", "online", "disabled"),
}


def _get(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


# Mappings whose keys are the user's (layer names, kernel knobs): any key is allowed inside them.
OPEN_MAPPINGS = (
    "prune.overrides",
    "quant.overrides",
    "backend.tuning",
    "model.kwargs",
    "data.train",
    "data.test",
    "data.val",
)


def unknown_keys(cfg: Any, schema: type = None, prefix: str = "") -> List[str]:
    """Keys of ``cfg`` that its schema (a dataclass) does not have: typos that ``+key=``/``++key=`` let in."""
    schema = schema or Config
    hints = typing.get_type_hints(schema)
    names = {f.name for f in dataclasses.fields(schema)}
    found = []
    for key in cfg.keys() if isinstance(cfg, (DictConfig, dict)) else []:
        dotted = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            found.append(dotted + (f" (did you mean {prefix}{close[0]}?)" if close else ""))
            continue
        sub = next((t for t in (hints[key], *typing.get_args(hints[key])) if dataclasses.is_dataclass(t)), None)
        if sub is not None and dotted not in OPEN_MAPPINGS and isinstance(cfg[key], (DictConfig, dict)):
            found += unknown_keys(cfg[key], sub, dotted + ".")
    return found


def refuse_unknown_keys(cfg: Any, schema: type = None) -> None:
    unknown = unknown_keys(cfg, schema)
    if unknown:
        raise ConfigError(
            f"{unknown[0]}: not a key of the config; keys come from its dataclasses "
            f"(sparsebench/config.py and the groups' config.py), open mappings only in "
            f"{', '.join(OPEN_MAPPINGS)}"
        )


def unused_settings(cfg: Config) -> List[str]:
    """Settings the chosen methods do not read (an experiment file may set them): one warning line each."""
    notes = []
    p, q, t = cfg.prune, cfg.quant, cfg.trainer
    if cfg.data.path is not None and cfg.data.name not in PATH_DATASETS and cfg.data.train is None:
        notes.append(f"data.path={cfg.data.path!r} is unused: data={cfg.data.name} reads no path")
    if p.method == "none" and not p.sensitivity:
        for key, value in (
            ("final_sparsity", p.final_sparsity),
            ("overrides", dict(p.overrides)),
            ("overrides_file", p.overrides_file),
        ):
            if value:
                notes.append(f"prune.{key}={value!r} is unused: prune=none prunes nothing")
    if cfg.data.val is not None and cfg.data.train is not None and cfg.data.val_fraction == 0:
        notes.append("data.val is unused: data.val_fraction=0 holds no validation share out of data.train")
    if q.method == "none" and q.bits != 32:
        notes.append(f"quant.bits={q.bits} is unused: quant=none keeps fp32 weights")
    if t.distill and p.method == "none" and q.method == "none":
        notes.append(f"trainer.distill={t.distill} is unused: without pruning or quantization there is no retraining")
    return notes


def validate(cfg: Config, overrides: Sequence[str] = ()) -> None:
    """Check keys, ranges and cross-field rules; raise ConfigError naming the first bad key. A setting given in
    ``overrides`` (the command line) that the chosen method does not read is refused too (see unused_settings)."""
    refuse_unknown_keys(cfg)
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    if "data.path" in given and cfg.data.train is None:
        _require(
            cfg.data.path is None or cfg.data.name in PATH_DATASETS,
            "data.path",
            cfg.data.path,
            f"null for data={cfg.data.name} (only {' and '.join(PATH_DATASETS)} read a path)",
        )
    for key, allowed in CHOICES.items():
        if key == "data.name" and (cfg.data.train is not None or cfg.data.test is not None):
            continue  # a dataset of the user's: its name is a label
        value = _get(cfg, key)
        _require(value in allowed, key, value, "one of " + ", ".join(allowed))

    from sparsebench.models import MODELS  # late: the registry imports torch

    _require(
        cfg.model._target_ is not None or cfg.model.name in MODELS,
        "model.name",
        cfg.model.name,
        "one of " + ", ".join(sorted(MODELS)) + ", or any label with model._target_",
    )
    d = cfg.data
    _require(
        (d.train is None) == (d.test is None),
        "data.test" if d.test is None else "data.train",
        None,
        "a Dataset (_target_) whenever the other one is given: a run trains on data.train and tests on data.test",
    )
    if d.val is not None and d.train is None:
        raise ConfigError(
            "data.val is not allowed without data.train: it reads data.train's validation share (data.val=null)"
        )
    if d.train is not None:
        _require(
            not d.on_device, "data.on_device", d.on_device, "false with data.train (a streamed dataset stays on disk)"
        )
        _require(
            not d.trivialaugment,
            "data.trivialaugment",
            d.trivialaugment,
            "false with data.train (it works on uint8 pixels: put torchvision's TrivialAugmentWide in the "
            "dataset's transform)",
        )
    _require(d.workers >= 0, "data.workers", d.workers, "an integer >= 0")
    _require(cfg.model.width > 0, "model.width", cfg.model.width, "a number > 0")

    t = cfg.trainer
    _require(
        t.cpu_threads is None or t.cpu_threads >= 1, "trainer.cpu_threads", t.cpu_threads, "null or an integer >= 1"
    )
    for key in ("epochs", "finetune_epochs", "checkpoint_every"):
        _require(getattr(t, key) >= 0, f"trainer.{key}", getattr(t, key), "an integer >= 0")
    for key in ("checkpoint_epochs", "eval_every"):
        _require(getattr(t, key) >= 1, f"trainer.{key}", getattr(t, key), "an integer >= 1")
    _require(t.lr > 0, "trainer.lr", t.lr, "a number > 0")
    _require(t.finetune_lr is None or t.finetune_lr > 0, "trainer.finetune_lr", t.finetune_lr, "null or a number > 0")
    _require(0 <= t.momentum < 1, "trainer.momentum", t.momentum, "a number in [0, 1)")
    _require(t.weight_decay >= 0, "trainer.weight_decay", t.weight_decay, "a number >= 0")
    _require(0 <= t.label_smoothing < 1, "trainer.label_smoothing", t.label_smoothing, "a number in [0, 1)")
    _require(t.ema_decay is None or 0 < t.ema_decay < 1, "trainer.ema_decay", t.ema_decay, "null or a number in (0, 1)")
    _require(0 <= t.distill <= 1, "trainer.distill", t.distill, "a weight in [0, 1] (0: off)")
    _require(t.distill_temperature > 0, "trainer.distill_temperature", t.distill_temperature, "a number > 0")
    _require(
        t.teacher is None or (t.distill > 0 and str(t.teacher).strip() != ""),
        "trainer.teacher",
        t.teacher,
        "null, or a run's dense.pt when trainer.distill > 0 (only distillation learns from a teacher)",
    )

    d = cfg.data
    _require(
        d.path is None or str(d.path).strip() != "",
        "data.path",
        d.path,
        "null or a file or folder (an empty path would read the current folder)",
    )
    _require(d.batch_size >= 1, "data.batch_size", d.batch_size, "an integer >= 1")
    _require(d.eval_batch_size >= 1, "data.eval_batch_size", d.eval_batch_size, "an integer >= 1")
    _require(d.cutout >= 0, "data.cutout", d.cutout, "an integer >= 0 (0: off)")
    _require(
        d.cutout == 0 or d.augment,
        "data.cutout",
        d.cutout,
        "0 unless data.augment=true (cutout is part of the augmentation)",
    )
    _require(
        not d.trivialaugment or d.augment,
        "data.trivialaugment",
        d.trivialaugment,
        "false unless data.augment=true (it is part of the augmentation)",
    )
    _require(0 < d.test_fraction < 1, "data.test_fraction", d.test_fraction, "a number in (0, 1)")
    _require(
        0 <= d.val_fraction < 1, "data.val_fraction", d.val_fraction, "a number in [0, 1) (0: no validation split)"
    )
    _require(
        d.val_fraction > 0 or not cfg.prune.sensitivity,
        "data.val_fraction",
        d.val_fraction,
        "> 0 with prune.sensitivity (the study's tolerance is a choice: it reads the validation split)",
    )
    _require(
        len(d.shape) == 3 and all(s >= 1 for s in d.shape),
        "data.shape",
        list(d.shape),
        "[channels, height, width], each >= 1",
    )
    _require(d.num_classes >= 2, "data.num_classes", d.num_classes, "an integer >= 2")
    _require(d.train_size >= 1 and d.test_size >= 1, "data.train_size", d.train_size, "train_size and test_size >= 1")

    validate_prune(cfg.prune, t.finetune_epochs)
    validate_quant(cfg.quant, t.finetune_epochs)
    validate_bench(cfg.backend, cfg.bench)
    # trainer.distill without pruning or quantization is left unused (a study's dense-only run keeps its config).
    if cfg.prune.method != "none" or cfg.quant.method != "none":
        _require(
            t.distill == 0 or t.epochs > 0 or t.init_from or t.teacher,
            "trainer.distill",
            t.distill,
            "0 unless there is a dense model to learn from (trainer.epochs > 0, trainer.init_from or trainer.teacher)",
        )
        _require(
            t.finetune_epochs >= 1,
            "trainer.finetune_epochs",
            t.finetune_epochs,
            "an integer >= 1 when pruning or quantization is on (they run while retraining)",
        )
