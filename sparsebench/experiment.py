"""The one pipeline: config -> data, model -> dense training -> pruning + QAT retraining
-> export -> benchmark -> metrics. Read it top to bottom."""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from omegaconf import OmegaConf

from sparsebench import layers
from sparsebench.average import WeightAverage
from sparsebench.bench import benchmark_model
from sparsebench.config import validate
from sparsebench.data import Batches, Dataset, load_dataset
from sparsebench.errors import ConfigError
from sparsebench.gpushare import GpuShare
from sparsebench.models import build_model
from sparsebench.prune import build_pruner, sensitivity_study
from sparsebench.quant import build_quantizer, export_model
from sparsebench.track import Tracker, last_checkpoint, make_tracker, write_csv, write_json, write_manifest
from sparsebench.train import atomic_torch_save, evaluate, fit, seed_everything


def run(cfg: Any, run_dir: Path, overrides: Sequence[str] = (), gpu_share: Optional[GpuShare] = None) -> Dict[str, Any]:
    """Run one experiment into ``run_dir``; metrics.json is written whatever happens.

    ``gpu_share``: this job's place on a GPU that other sweep jobs use too (its benchmark runs alone).
    """
    started, phases = time.time(), _Phases()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics: Dict[str, Any] = {"status": "failed"}
    tracker: Tracker = Tracker()
    exit_code = 1
    try:
        validate(cfg)
        config = OmegaConf.to_container(cfg, resolve=True)
        write_manifest(run_dir, config, cfg.seed, overrides)
        tracker = make_tracker(cfg.logger, run_dir, config, name=f"{cfg.name}/{run_dir.name}",
                               resume=cfg.trainer.resume)
        metrics.update(_pipeline(cfg, run_dir, tracker, gpu_share, phases))
        metrics["status"] = "ok"
        exit_code = 0
    except BaseException as e:
        metrics["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        metrics["runtime_s"] = round(time.time() - started, 3)
        write_json(run_dir / "metrics.json", metrics)
        tracker.summary(metrics)
        tracker.finish(exit_code)
    return metrics


class _Phases:
    """Wall seconds of each phase, as metrics.json's ``phase_s/<name>``: where a job's runtime_s goes
    (setup; data decoding; compile, evaluation and checkpoints inside the fits; export; the benchmark
    with its autotuning and, in a sweep sharing the GPU, its wait for the other jobs' benchmarks)."""

    def __init__(self) -> None:
        self.since, self.seconds = time.perf_counter(), {}

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[f"phase_s/{name}"] = round(now - self.since, 3)
        self.since = now


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda: no CUDA GPU is visible here; use trainer.device=auto or cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _pipeline(cfg: Any, run_dir: Path, tracker: Tracker, gpu_share: Optional[GpuShare],
              phases: _Phases) -> Dict[str, Any]:
    t = cfg.trainer
    device = pick_device(t.device)
    if device.type == "cpu" and t.cpu_threads:
        torch.set_num_threads(t.cpu_threads)
    seed_everything(cfg.seed, t.deterministic)
    if t.compile:  # a sweep's later job in a reused worker: earlier jobs' graphs would count toward dynamo's recompile limit
        torch.compiler.reset()
    checkpoint = last_checkpoint(run_dir)
    resume = _load_resume(checkpoint) if t.resume else None
    phases.done("setup")  # config check, manifest, logger, the checkpoint to resume

    # Data and model.
    data = load_dataset(cfg.data)
    if cfg.data.on_device:
        data = data.to(device)
    channels_last = t.channels_last and device.type == "cuda"

    def new_model(spec: Any = cfg.model) -> torch.nn.Module:  # spec: a model config (name, width)
        net = build_model(spec["name"], in_channels=data.in_channels, num_classes=data.num_classes,
                          image_size=data.image_size, width=spec.get("width", 1.0)).to(device)
        return net.to(memory_format=torch.channels_last) if channels_last else net

    model = new_model()
    train, test = _batches(data, cfg, device, channels_last)
    # One test batch (a copy, not a view that keeps its chunk alive): the pruner's and the layer
    # table's forward passes, the benchmark's input.
    sample = next(iter(test))[0].clone()
    pruner = build_pruner(cfg.prune, model, sample)
    quantizer = build_quantizer(cfg.quant, model)
    hooks = [h for h in (pruner, quantizer) if h is not None]
    # Another network's dense model to distil, built now: a wrong trainer.teacher fails before any training.
    other_teacher, acc_teacher = _other_teacher(cfg, new_model) if hooks and t.distill and t.teacher else (None, None)
    phases.done("data")
    share = [gpu_share] if gpu_share is not None else []  # pauses training while another job benchmarks

    # Dense training (or a shared dense model from trainer.init_from).
    timings: Dict[str, float] = {}  # the last epoch's time per step of each phase
    if t.init_from:
        _load_weights(model, t.init_from, cfg)
        acc_dense = evaluate(model, test, t.amp)
    elif resume is not None and resume["phase"] == "finetune":
        acc_dense = resume["extra"]["acc_dense"]
    else:
        average = [WeightAverage(t.ema_decay, test, "dense", t.amp)] if t.ema_decay else []
        timings.update(fit(model, train, test, t, phase="dense", epochs=t.epochs, lr=t.lr, hooks=share + average,
                           checkpoint=checkpoint, resume_from=resume, log=tracker.log))
        acc_dense = evaluate(model, test, t.amp)
        atomic_torch_save({"model": model.state_dict(), "acc_dense": acc_dense,
                           "model_cfg": OmegaConf.to_container(cfg.model), "data": cfg.data.name},
                          run_dir / "dense.pt")
    phases.done("dense")
    tracker.log({"acc_dense": acc_dense}, t.epochs * len(train))
    # experiment=sensitivity: prune one layer at a time, write sensitivity.* (prune/); done before a finetune resume.
    if cfg.prune.sensitivity and not (resume is not None and resume["phase"] == "finetune"):
        sensitivity_study(cfg.prune, model, lambda: evaluate(model, test, t.amp), acc_dense, run_dir, tracker)
        phases.done("sensitivity")

    # Pruning and quantization-aware retraining.
    if hooks:
        teacher = _teacher(cfg, run_dir, new_model, other_teacher) if t.distill else None
        timings.update(fit(model, train, test, t, phase="finetune", epochs=t.finetune_epochs,
                           lr=t.finetune_lr or t.lr, hooks=hooks + share, checkpoint=checkpoint,
                           extra={"acc_dense": acc_dense},
                           resume_from=resume if resume is not None and resume["phase"] == "finetune" else None,
                           log=tracker.log, step_offset=t.epochs * len(train), teacher=teacher))
        del teacher, other_teacher  # not through export and the benchmark
    acc_final = evaluate(model, test, t.amp)
    phases.done("finetune")

    # Per-layer facts, the packed export, the benchmark and the run's summary numbers.
    rows = layers.describe(model, sample)
    packed_path = run_dir / "packed.safetensors"
    packed = export_model(model, hooks, packed_path) or {}
    for row in rows:
        row.update({"bits": 32, "footprint_bytes": row["dense_bytes"]}, **packed.get(row["layer"], {}))
    phases.done("export")
    with gpu_share.exclusive() if gpu_share is not None else nullcontext():  # timed with the GPU to itself
        bench_rows, bench_metrics = benchmark_model(cfg.backend, cfg.bench, model, packed_path if packed else None,
                                                    sample, device)
    phases.done("bench")
    dense_bytes = sum(r["dense_bytes"] for r in rows)
    footprint = sum(r["footprint_bytes"] for r in rows)
    summary = {
        "acc_dense": acc_dense,
        "acc_final": acc_final,
        **({"acc_teacher": acc_teacher} if acc_teacher is not None else {}),  # trainer.teacher's own test accuracy
        "sparsity": layers.sparsity(model, pruner.layer_names if pruner is not None else None),
        "weight_bits": _mean_bits(rows),
        "dense_bytes": dense_bytes,
        "footprint_bytes": footprint,
        "compression": dense_bytes / max(footprint, 1),
        # The compute the sparse weights keep: what a batched sparse kernel can hope to save.
        "macs_kept": _macs(rows, "nnz") / max(_macs(rows, "params"), 1),
        "params": sum(r["params"] for r in rows),
        "device": str(device),
        **{k: round(v, 4) for k, v in timings.items() if k.endswith("step_ms")},
        **phases.seconds,
        **bench_metrics,
    }
    layer_rows = _join_bench(rows, bench_rows)
    write_csv(run_dir / "layers.csv", layer_rows)
    tracker.table("layers", layer_rows)  # with the timings: the W&B table of layer x backend x batch
    return summary


def _macs(rows: list, count: str) -> int:
    """Multiply-adds per sample of ``count`` weights (``nnz`` or ``params``) of every layer."""
    return sum(r[count] * r["macs_per_weight"] for r in rows)


def _mean_bits(rows: list) -> float:
    """Bits per stored weight, weighted by non-zeros: the quantizer's width, or the mix of a
    mixed-precision run (32 when nothing is quantized)."""
    nnz = sum(r["nnz"] for r in rows)
    mean = sum(r["bits"] * r["nnz"] for r in rows) / max(nnz, 1)
    return int(mean) if float(mean).is_integer() else round(mean, 3)


def _join_bench(rows: list, bench_rows: list) -> list:
    """layers.csv: one row per layer x backend x batch; layers without timings keep one row."""
    if not bench_rows:
        return [{**r, "backend": None, "batch": None, "time_us": None, "spread_us": None} for r in rows]
    by_name = {r["layer"]: r for r in rows}
    return [{**by_name.get(b["layer"], {}), **b} for b in bench_rows]


def _batches(data: Dataset, cfg: Any, device: torch.device, channels_last: bool) -> tuple:
    side = min(data.x_train.shape[-2:])
    if cfg.data.cutout > side:  # only known once the images are: a larger square blanks most of every image
        raise ConfigError(f"data.cutout={cfg.data.cutout} is not allowed: at most the image side ({side} here)")
    common = dict(mean=data.mean, std=data.std, device=device, channels_last=channels_last)
    train = Batches(data.x_train, data.y_train, batch_size=cfg.data.batch_size, shuffle=True,
                    augment=cfg.data.augment, cutout=cfg.data.cutout, trivialaugment=cfg.data.trivialaugment,
                    seed=cfg.seed, drop_last=cfg.data.drop_last, **common)
    test = Batches(data.x_test, data.y_test, batch_size=cfg.data.eval_batch_size, shuffle=False, **common)
    return train, test


def _load_resume(checkpoint: Path) -> Optional[Dict[str, Any]]:
    if not checkpoint.exists():
        raise ConfigError(f"trainer.resume=true: no checkpoint at {checkpoint}; resume needs the run directory "
                          f"of an earlier run (hydra.run.dir=<that dir>)")
    return torch.load(checkpoint, map_location="cpu", weights_only=False)


def _other_teacher(cfg: Any, new_model: Callable[..., torch.nn.Module]) -> Tuple[torch.nn.Module, Optional[float]]:
    """trainer.teacher's dense model (its dense.pt names the network, which may be another than
    this job's), and its test accuracy as that run measured it."""
    key = f"trainer.teacher={cfg.trainer.teacher!r}"
    state = _read_file(cfg.trainer.teacher, key, f"give the dense.pt of a run on data={cfg.data.name}")
    spec = state.get("model_cfg") if isinstance(state, dict) else None
    if spec is None or state.get("data") != cfg.data.name:
        found = f"model {spec}, data {state.get('data')!r}" if spec else "no run's dense model"
        raise ConfigError(f"{key}: not the dense.pt of a run on data={cfg.data.name} (found {found})")
    teacher = new_model(spec)
    _fit_weights(teacher, state["model"], key, f"the model it names ({spec})")
    return teacher, state.get("acc_dense")


def _teacher(cfg: Any, run_dir: Path, new_model: Callable[..., torch.nn.Module],
             other: Optional[torch.nn.Module]) -> torch.nn.Module:
    """Distillation's teacher: ``other`` (trainer.teacher's), else this job's own dense model, also
    when resuming: from the file it was shared in (init_from) or saved to."""
    if other is not None:
        return other
    t = cfg.trainer
    source = t.init_from or str(run_dir / "dense.pt")
    if not Path(source).expanduser().exists():
        raise ConfigError(f"trainer.distill={t.distill}: no dense model to learn from at {source} (a run "
                          "resumed with distillation needs its dense.pt or trainer.init_from)")
    teacher = new_model()
    _load_weights(teacher, source, cfg)
    return teacher


def _load_weights(model: torch.nn.Module, path: str, cfg: Any) -> None:
    key = f"trainer.init_from={path!r}"
    state = _read_file(path, key, "give a dense.pt or checkpoints/last.pt of a run")
    _fit_weights(model, state.get("model", state), key,
                 f"model={cfg.model.name} (width {cfg.model.width}) on data={cfg.data.name}")


def _read_file(path: str, key: str, hint: str) -> Any:
    """A weights file a config key names; a missing one is one line naming the key."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"{key}: no such file ({hint})")
    return torch.load(file, map_location="cpu", weights_only=False)


def _fit_weights(model: torch.nn.Module, weights: Dict[str, Any], key: str, expected: str) -> None:
    """load_state_dict; weights of another shape are named by the config key that gave them."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        lines = str(e).splitlines()
        first = (lines[1] if len(lines) > 1 else lines[0]).strip()
        raise ConfigError(f"{key}: its weights do not fit {expected}: {first}") from None
