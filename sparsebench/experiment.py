"""The pipeline as named stages, in the order the data flows:

    setup -> dense training -> compression (pruning + QAT retraining) -> export -> benchmark -> summary

``run`` wraps them in the run envelope (manifest, tracker; metrics.json whatever happens). Each
stage is a function of the ``Job`` (config, run directory, device, data, where a resume starts)
and of what earlier stages returned. Files (checkpoints, weights, teachers) go through
``checkpoints``; file names through ``rundir``.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import Subset, random_split

from sparsebench import checkpoints, layers
from sparsebench.average import WeightAverage
from sparsebench.bench import benchmark_model
from sparsebench.config import unused_settings, validate
from sparsebench.data import Batches, Dataset, hold_out, load_dataset
from sparsebench.distill import Distillation
from sparsebench.errors import ConfigError
from sparsebench.loaders import CropFlip, Loader, stream
from sparsebench.models import build_model
from sparsebench.prune import build_pruner, sensitivity_study
from sparsebench.quant import build_quantizer, export_model
from sparsebench.rundir import DENSE, LAYERS, PACKED, checkpoint_path, write_csv
from sparsebench.track import Tracker, envelope
from sparsebench.train import TrainHook, evaluate, fit, seed_everything

if TYPE_CHECKING:  # annotations only: no import at run time
    from sparsebench.config import Config

log = logging.getLogger("sparsebench")


def run(cfg: Config, run_dir: Path, overrides: Sequence[str] = (), gpu_share: Optional[Any] = None) -> Dict[str, Any]:
    """Run one experiment into ``run_dir``; metrics.json is written whatever happens.

    ``gpu_share``: this job's place on a GPU that other sweep jobs use too (multirun.gpus.GpuShare:
    its benchmark runs alone, its training pauses for theirs)."""
    with envelope(run_dir) as record:
        validate(cfg, overrides)
        for note in unused_settings(cfg):
            log.warning(note)
        record.start(
            OmegaConf.to_container(cfg, resolve=True),
            cfg.seed,
            overrides,
            cfg.logger,
            name=f"{cfg.name}/{Path(run_dir).name}",
            resume=cfg.trainer.resume,
        )
        record.metrics.update(pipeline(cfg, Path(run_dir), record.tracker, gpu_share))
    return record.metrics


def pipeline(cfg: Config, run_dir: Path, tracker: Tracker, gpu_share: Optional[Any] = None) -> Dict[str, Any]:
    phases = Phases()
    job = setup(cfg, run_dir, tracker, gpu_share)
    phases.done("setup")
    model, plan = load_data_and_model(job)
    phases.done("data")
    dense = train_dense(job, model)
    phases.done("dense")
    if cfg.prune.sensitivity and not job.in_finetune:  # prune one layer at a time (experiment=sensitivity)
        sensitivity_study(
            cfg.prune, model, lambda: evaluate(model, job.val, cfg.trainer.amp), dense.acc_val, run_dir, tracker
        )
        phases.done("sensitivity")
    compressed = compress(job, model, plan, dense)
    phases.done("finetune")
    exported = export(job, model, plan)
    phases.done("export")
    bench_rows, bench_metrics = benchmark(job, model, exported)
    phases.done("bench")
    write_csv(run_dir / LAYERS, join_layer_rows(exported.rows, bench_rows))
    tracker.table("layers", join_layer_rows(exported.rows, bench_rows))  # the W&B table of layer x backend x batch
    return {**summary(job, model, plan, dense, compressed, exported), **phases.seconds, **bench_metrics}


# ---------------------------------------------------------------- what the stages share


class Phases:
    """Wall seconds of each stage, as metrics.json's ``phase_s/<name>``: where a job's runtime_s goes
    (setup; data decoding; compile, evaluation and checkpoints inside the fits; export; the benchmark
    with its autotuning and, in a sweep sharing the GPU, its wait for the other jobs' benchmarks)."""

    def __init__(self) -> None:
        self.since, self.seconds = time.perf_counter(), {}

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[f"phase_s/{name}"] = round(now - self.since, 3)
        self.since = now


@dataclass
class Job:
    """One run's context: its config and folder, the device, the data, and where a resume starts."""

    cfg: Config
    run_dir: Path
    tracker: Tracker
    device: torch.device
    share: Optional[Any] = None  # multirun.gpus.GpuShare
    resume: Optional[Dict[str, Any]] = None  # the checkpoint trainer.resume=true continues
    data: Optional[Any] = None  # data.Dataset in memory, or Streamed (data.train/test)
    train: Optional[Batches] = None  # data.Batches, or loaders.Loader over a DataLoader
    val: Optional[Batches] = None  # the validation split (data.val_fraction), else None
    test: Optional[Batches] = None
    val_size: int = 0
    sample: Optional[torch.Tensor] = None  # one test batch: the pruner's, the layer table's and the benchmark's input

    @property
    def in_finetune(self) -> bool:
        """The run resumes inside compression: dense training is done."""
        return self.resume is not None and self.resume["phase"] == "finetune"

    @property
    def scored(self) -> Batches:
        """What the loop scores every few epochs: the validation split, or the test set without one."""
        return self.val if self.val is not None else self.test

    def accuracy(self, model: nn.Module) -> Dict[str, float]:
        """The end-of-phase scores: ``acc`` on the test set and ``acc_val`` on the validation split."""
        amp = self.cfg.trainer.amp
        return {
            "acc": evaluate(model, self.test, amp),
            "acc_val": evaluate(model, self.val, amp) if self.val is not None else None,
        }

    @property
    def checkpoint(self) -> Path:
        return checkpoint_path(self.run_dir)

    @property
    def share_hooks(self) -> List[TrainHook]:
        return [self.share] if self.share is not None else []

    def paused_s(self) -> float:
        return self.share.paused_s if self.share is not None else 0.0

    def new_model(self, spec: Any = None) -> nn.Module:
        """The configured network (or ``spec``, another model config) for this data, on the device."""
        spec = spec if spec is not None else self.cfg.model
        if spec.get("_target_"):  # any importable factory, with its own arguments
            net = build("model._target_", {"_target_": spec["_target_"], **spec.get("kwargs", {})}).to(self.device)
        else:
            net = build_model(
                spec["name"],
                in_channels=self.data.in_channels,
                num_classes=self.data.num_classes,
                image_size=self.data.image_size,
                width=spec.get("width", 1.0),
            ).to(self.device)
        return net.to(memory_format=torch.channels_last) if self.channels_last else net

    @property
    def channels_last(self) -> bool:
        return bool(self.cfg.trainer.channels_last) and self.device.type == "cuda"


@dataclass
class Plan:
    """How the model is compressed: the hooks of the retraining, and what the distillation learns from."""

    pruner: Optional[TrainHook]
    quantizer: Optional[TrainHook]
    teacher: Optional[nn.Module] = None  # trainer.teacher's network (another run's), built before any training
    acc_teacher: Optional[float] = None

    @property
    def hooks(self) -> List[TrainHook]:
        return [h for h in (self.pruner, self.quantizer) if h is not None]


@dataclass
class Dense:
    acc: float  # on the test set
    acc_val: Optional[float] = None  # on the validation split, when there is one
    last_epoch: Dict[str, float] = field(default_factory=dict)  # fit's metrics of its last epoch (step_ms among them)


@dataclass
class Compressed:
    acc: float
    acc_val: Optional[float] = None
    last_epoch: Dict[str, float] = field(default_factory=dict)  # fit's metrics of its last epoch (step_ms among them)


@dataclass
class Exported:
    rows: List[Dict[str, Any]]  # layers.describe + the export's facts, one row per layer
    packed: Optional[Path]


# ---------------------------------------------------------------- the stages


def setup(cfg: Config, run_dir: Path, tracker: Tracker, share: Optional[Any]) -> Job:
    """Device, seed, threads and the checkpoint to resume: decided once, here."""
    t = cfg.trainer
    device = pick_device(t.device)
    if device.type == "cpu" and t.cpu_threads:
        torch.set_num_threads(t.cpu_threads)
    seed_everything(cfg.seed, t.deterministic)
    if t.compile:  # a sweep's later job in a reused worker: earlier jobs' graphs would count toward dynamo's limit
        torch.compiler.reset()
    job = Job(cfg, run_dir, tracker, device, share)
    if t.resume:
        if not job.checkpoint.exists():
            raise ConfigError(
                f"trainer.resume=true: no checkpoint at {job.checkpoint}; resume needs the run "
                "directory of an earlier run (hydra.run.dir=<that dir>)"
            )
        job.resume = checkpoints.load_checkpoint(job.checkpoint)
    return job


def load_data_and_model(job: Job) -> Tuple[nn.Module, "Plan"]:
    """The data as batches, the network, and the compression plan (a bad prune, quant or teacher
    setting fails here, before any training)."""
    cfg = job.cfg
    if cfg.data.train is not None:
        stream_data(job)
    else:
        job.data = hold_out(load_dataset(cfg.data), cfg.data.val_fraction)
        if cfg.data.on_device:
            job.data = job.data.to(job.device)
        job.train, job.val, job.test = make_batches(job.data, cfg, job.device, job.channels_last)
        job.val_size = len(job.data.y_val) if job.data.y_val is not None else 0
    job.sample = next(iter(job.test))[0].clone()  # a copy, not a view that keeps its chunk alive
    model = job.new_model()
    plan = Plan(build_pruner(cfg.prune, model, job.sample), build_quantizer(cfg.quant, model))
    if plan.hooks and cfg.trainer.distill and cfg.trainer.teacher:
        plan.teacher, plan.acc_teacher = other_teacher(job)
    return model, plan


def train_dense(job: Job, model: nn.Module) -> Dense:
    """Dense training, or the dense model a sweep shares (trainer.init_from); saved as dense.pt."""
    cfg, t = job.cfg, job.cfg.trainer
    if t.init_from:
        checkpoints.load_weights(model, t.init_from, f"trainer.init_from={t.init_from!r}", expected_model(cfg))
        dense = Dense(**job.accuracy(model))
    elif job.in_finetune:
        extra = job.resume["extra"]
        dense = Dense(extra["acc_dense"], extra.get("acc_val_dense"))
    else:
        average = [WeightAverage(t.ema_decay, job.scored, "dense", t.amp)] if t.ema_decay else []
        last = fit(
            model,
            job.train,
            job.scored,
            t,
            phase="dense",
            epochs=t.epochs,
            lr=t.lr,
            hooks=job.share_hooks + average,
            checkpoint=job.checkpoint,
            resume_from=job.resume,
            log=job.tracker.log,
            paused=job.paused_s,
        )
        dense = Dense(**job.accuracy(model), last_epoch=last)
        checkpoints.save_dense(job.run_dir / DENSE, model, dense.acc, OmegaConf.to_container(cfg.model), cfg.data.name)
        job.tracker.artifact(job.run_dir / DENSE, artifact_name(cfg, "dense"), "model")
    job.tracker.log(phase_scores("dense", dense), t.epochs * len(job.train))
    return dense


def compress(job: Job, model: nn.Module, plan: Plan, dense: Dense) -> Compressed:
    """Pruning and quantization-aware retraining (nothing to do without hooks), distilling if asked."""
    t = job.cfg.trainer
    if not plan.hooks:
        return Compressed(**job.accuracy(model))
    loss = distillation(job, plan) if t.distill else None
    last = fit(
        model,
        job.train,
        job.scored,
        t,
        phase="finetune",
        epochs=t.finetune_epochs,
        lr=t.finetune_lr or t.lr,
        hooks=plan.hooks + job.share_hooks,
        checkpoint=job.checkpoint,
        loss=loss,
        extra=phase_scores("dense", dense),
        resume_from=job.resume if job.in_finetune else None,
        log=job.tracker.log,
        step_offset=t.epochs * len(job.train),
        paused=job.paused_s,
    )
    plan.teacher = None  # not through export and the benchmark
    return Compressed(**job.accuracy(model), last_epoch=last)


def export(job: Job, model: nn.Module, plan: Plan) -> Exported:
    """Per-layer facts and the packed file (when something was pruned or quantized)."""
    rows = layers.describe(model, job.sample)
    path = job.run_dir / PACKED
    packed = export_model(model, plan.hooks, path) or {}
    if packed:
        job.tracker.artifact(path, artifact_name(job.cfg, "packed"), "model")
    for row in rows:
        row.update({"bits": 32, "footprint_bytes": row["dense_bytes"]}, **packed.get(row["layer"], {}))
    return Exported(rows, path if packed else None)


def benchmark(job: Job, model: nn.Module, exported: Exported):
    """Every layer and the whole network on the backends, timed with the GPU to this job alone."""
    with job.share.exclusive() if job.share is not None else nullcontext():
        return benchmark_model(job.cfg.backend, job.cfg.bench, model, exported.packed, job.sample, job.device)


def summary(
    job: Job, model: nn.Module, plan: Plan, dense: Dense, compressed: Compressed, exported: Exported
) -> Dict[str, Any]:
    """The run's headline numbers for metrics.json (DESIGN.md section 3)."""
    rows = exported.rows
    dense_bytes = sum(r["dense_bytes"] for r in rows)
    footprint = sum(r["footprint_bytes"] for r in rows)
    last_epochs = {**dense.last_epoch, **compressed.last_epoch}
    return {
        **phase_scores("dense", dense),
        **phase_scores("final", compressed),
        "val_size": job.val_size,
        **({"acc_teacher": plan.acc_teacher} if plan.acc_teacher is not None else {}),
        "sparsity": layers.sparsity(model, plan.pruner.layer_names if plan.pruner is not None else None),
        "weight_bits": mean_bits(rows),
        "dense_bytes": dense_bytes,
        "footprint_bytes": footprint,
        "compression": dense_bytes / max(footprint, 1),
        # The compute the sparse weights keep: what a batched sparse kernel can hope to save.
        "macs_kept": macs(rows, "nnz") / max(macs(rows, "params"), 1),
        "params": sum(r["params"] for r in rows),
        "device": str(job.device),
        **{k: round(v, 4) for k, v in last_epochs.items() if k.endswith("step_ms")},
    }


# ---------------------------------------------------------------- helpers


def phase_scores(phase: str, result: Any) -> Dict[str, float]:
    """``acc_<phase>`` (test set) and, with a validation split, ``acc_val_<phase>``."""
    scores = {f"acc_{phase}": result.acc}
    if result.acc_val is not None:
        scores[f"acc_val_{phase}"] = result.acc_val
    return scores


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda: no CUDA GPU is visible here; use trainer.device=auto or cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def check_cutout(cutout: int, image: torch.Tensor) -> None:
    """Only known once the images are: a square larger than the image blanks most of every image."""
    side = min(image.shape[-2:])
    if cutout > side:
        raise ConfigError(f"data.cutout={cutout} is not allowed: at most the image side ({side} here)")


def make_batches(data: Dataset, cfg: Config, device: torch.device, channels_last: bool) -> tuple:
    check_cutout(cfg.data.cutout, data.x_train[0])
    common = dict(mean=data.mean, std=data.std, device=device, channels_last=channels_last)
    train = Batches(
        data.x_train,
        data.y_train,
        batch_size=cfg.data.batch_size,
        shuffle=True,
        augment=cfg.data.augment,
        cutout=cfg.data.cutout,
        trivialaugment=cfg.data.trivialaugment,
        seed=cfg.seed,
        drop_last=cfg.data.drop_last,
        **common,
    )
    held_out = lambda x, y: Batches(x, y, batch_size=cfg.data.eval_batch_size, shuffle=False, **common)  # noqa: E731
    val = held_out(data.x_val, data.y_val) if data.x_val is not None else None
    return train, val, held_out(data.x_test, data.y_test)


@dataclass
class Streamed:
    """What a run knows of the user's datasets (data.train/test): what the registry's models are built for."""

    name: str
    in_channels: int
    image_size: int
    num_classes: int


def stream_data(job: Job) -> None:
    """data.train/test instantiated and streamed through DataLoaders; the validation split is a seeded
    random share of data.train (the same images for every run seed)."""
    d = job.cfg.data
    train, test = build("data.train", d.train), build("data.test", d.test)
    classes = getattr(train, "classes", None)
    x, _ = train[0]
    check_cutout(d.cutout, x)
    val = None
    if d.val_fraction > 0:
        held = int(round(d.val_fraction * len(train)))
        whole = train
        train, val = random_split(train, [len(train) - held, held], generator=torch.Generator().manual_seed(0))
        if d.val is not None:  # the same items, read with evaluation transforms
            val = Subset(same_items("data.val", build("data.val", d.val), whole), val.indices)
        job.val_size = held

    def loader(dataset: Any, batch_size: int, shuffle: bool, drop_last: bool = False, augment: bool = False) -> Loader:
        batches = stream(
            dataset,
            batch_size,
            shuffle=shuffle,
            seed=job.cfg.seed,
            workers=d.workers,
            drop_last=drop_last,
            pin_memory=job.device.type == "cuda",
        )
        return Loader(batches, job.device, job.channels_last, CropFlip(d.cutout, job.cfg.seed) if augment else None)

    job.train = loader(train, d.batch_size, True, d.drop_last, d.augment)
    job.val = loader(val, d.eval_batch_size, False) if val is not None else None
    job.test = loader(test, d.eval_batch_size, False)
    job.data = Streamed(d.name, x.shape[0], x.shape[-1], len(classes) if classes else d.num_classes)


def same_items(key: str, dataset: Any, train: Any) -> Any:
    """``dataset``, once it is known to list as many items as data.train (it is meant to be the same ones)."""
    if len(dataset) != len(train):
        raise ConfigError(
            f"{key}: has {len(dataset)} items and data.train {len(train)}: it must be data.train's items "
            "(read with evaluation transforms)"
        )
    return dataset


def artifact_name(cfg: Config, kind: str) -> str:
    """A W&B artifact's name: the experiment and what the file is; W&B versions the runs' files under it."""
    return f"{cfg.name}-{kind}"


def build(key: str, node: Any) -> Any:
    """Hydra's instantiate of a user's ``_target_`` node; whatever goes wrong is one line naming ``key``."""
    try:
        return instantiate(node)
    except Exception as e:  # an import error, a bad argument, a missing folder: the user's to fix
        cause = e.__cause__ or e
        raise ConfigError(f"{key}: could not build it ({type(cause).__name__}: {str(cause).splitlines()[0]})") from e


def expected_model(cfg: Config) -> str:
    return f"model={cfg.model.name} (width {cfg.model.width}) on data={cfg.data.name}"


def other_teacher(job: Job) -> Tuple[nn.Module, Optional[float]]:
    """trainer.teacher's dense model (its dense.pt names the network, which may be another than this
    job's) and its test accuracy as that run measured it."""
    cfg = job.cfg
    key = f"trainer.teacher={cfg.trainer.teacher!r}"
    state = checkpoints.read_dense(cfg.trainer.teacher, key, cfg.data.name)
    teacher = job.new_model(state["model_cfg"])
    checkpoints.fit_weights(teacher, state["model"], key, f"the model it names ({state['model_cfg']})")
    return teacher, state.get("acc_dense")


def distillation(job: Job, plan: Plan) -> Distillation:
    """The retraining loss that also learns the dense model's softened outputs: trainer.teacher's
    network, else this job's own dense model, also when resuming (from init_from or its dense.pt)."""
    t = job.cfg.trainer
    teacher = plan.teacher
    if teacher is None:
        source = t.init_from or str(job.run_dir / DENSE)
        if not Path(source).expanduser().exists():
            raise ConfigError(
                f"trainer.distill={t.distill}: no dense model to learn from at {source} (a run resumed "
                "with distillation needs its dense.pt or trainer.init_from)"
            )
        teacher = job.new_model()
        checkpoints.load_weights(teacher, source, f"trainer.init_from={source!r}", expected_model(job.cfg))
    task = nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)
    return Distillation(teacher, t.distill, t.distill_temperature, task, t.compile_mode if t.compile else None)


def macs(rows: list, count: str) -> int:
    """Multiply-adds per sample of ``count`` weights (``nnz`` or ``params``) of every layer."""
    return sum(r[count] * r["macs_per_weight"] for r in rows)


def mean_bits(rows: list) -> float:
    """Bits per stored weight, weighted by non-zeros: the quantizer's width, or the mix of a
    mixed-precision run (32 when nothing is quantized)."""
    nnz = sum(r["nnz"] for r in rows)
    mean = sum(r["bits"] * r["nnz"] for r in rows) / max(nnz, 1)
    return int(mean) if float(mean).is_integer() else round(mean, 3)


def join_layer_rows(rows: list, bench_rows: list) -> list:
    """layers.csv: one row per layer x backend x batch; layers without timings keep one row."""
    if not bench_rows:
        return [{**r, "backend": None, "batch": None, "time_us": None, "spread_us": None} for r in rows]
    by_name = {r["layer"]: r for r in rows}
    return [{**by_name.get(b["layer"], {}), **b} for b in bench_rows]
