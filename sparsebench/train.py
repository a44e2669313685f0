"""The training loop. Pruning and quantization reach it only as ``TrainHook``s, distillation as the loss."""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, Iterator, List, Optional

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from sparsebench import checkpoints
from sparsebench.data import Batches
from sparsebench.errors import ConfigError, StopRequested

if TYPE_CHECKING:  # annotations only: no import at run time
    from sparsebench.config import TrainerConfig

LogFn = Callable[[Dict[str, float], int], None]
# loss(logits, labels, inputs): cross-entropy, or a distillation that also needs the inputs.
LossFn = Callable[[Tensor, Tensor, Tensor], Tensor]


class TrainHook:
    """A plug-in of the training loop (the pruner, the quantizer).

    Call order: ``on_fit_start`` (may re-parametrize the model, before the optimizer exists)
    -> per step ``before_step`` (after backward) and ``after_step`` (after the optimizer)
    -> ``on_epoch_end`` (and ``on_evaluate`` at the epochs whose test accuracy the loop scores,
    ``trainer.eval_every``) -> ``on_fit_end``. ``state_dict`` goes into every checkpoint.
    """

    name = "hook"

    def on_fit_start(self, model: nn.Module, steps_per_epoch: int, total_steps: int) -> None:
        pass

    def before_step(self, step: int, model: nn.Module) -> None:
        pass

    def after_step(self, step: int, model: nn.Module) -> None:
        pass

    def on_epoch_end(self, epoch: int, model: nn.Module) -> Dict[str, float]:
        return {}

    def on_evaluate(self, epoch: int, model: nn.Module) -> Dict[str, float]:
        """Metrics to score beside the model's test accuracy (which the loop has just taken)."""
        return {}

    def on_fit_end(self, model: nn.Module) -> None:
        pass

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


# ---------------------------------------------------------------- setup


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    else:
        torch.backends.cudnn.benchmark = True


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: nn.Module, batches: Batches, amp: bool = False) -> float:
    """Top-1 accuracy as a fraction."""
    was_training = model.training
    model.eval()
    correct, total = torch.zeros((), dtype=torch.long, device=batches.device), 0
    with _autocast(batches.device, amp):
        for x, y in batches:
            correct += (model(x).argmax(1) == y).sum()  # counted on the device: one sync at the end, not one a batch
            total += len(y)
    model.train(was_training)
    return correct.item() / max(total, 1)


def evaluation_due(epoch: int, epochs: int, every: int) -> bool:
    """Whether the end of ``epoch`` (from 0) is tested: every ``every``-th epoch and the last."""
    return (epoch + 1) % every == 0 or epoch + 1 == epochs


def _autocast(device: torch.device, amp: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda")


# ---------------------------------------------------------------- the loop


def make_optimizer(params: Iterable[nn.Parameter], cfg: TrainerConfig, lr: float) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0
    )


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainerConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    total = max(total_steps, 1)
    if cfg.scheduler == "cosine":
        factor = lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))  # noqa: E731
    elif cfg.scheduler == "step":
        factor = lambda s: cfg.step_gamma ** ((s >= total // 2) + (s >= 3 * total // 4))  # noqa: E731
    else:
        factor = lambda s: 1.0  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@contextlib.contextmanager
def _stop_on_sigterm(phase: str) -> Iterator[List[int]]:
    """While training, SIGTERM (a scheduler's time limit, `timeout`, a kill) asks the loop to save a
    checkpoint and stop after the step it is in (after the evaluation, if that step ends an epoch), so
    a resumed run loses nothing. A second SIGTERM gets the handler from before (by default: the
    process ends). Left alone: SIGTERM ignored or handled outside Python, and threads other than the
    main one (signals reach only it)."""
    received: List[int] = []
    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or previous in (None, signal.SIG_IGN):
        yield received
        return

    def request_stop(signum: int, frame: Any) -> None:
        received.append(signum)
        signal.signal(signal.SIGTERM, previous)

    signal.signal(signal.SIGTERM, request_stop)
    try:
        yield received
    except Exception as e:
        if received:  # e.g. torch.compile's workers, in the same process group, died of the same SIGTERM
            raise StopRequested(
                f"SIGTERM during {phase} training, which then failed before it could save "
                f"({type(e).__name__}: {e}); trainer.resume=true continues from the last "
                f"checkpoint"
            ) from e
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def cross_entropy(cfg: TrainerConfig) -> LossFn:
    task = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    return lambda logits, y, x: task(logits, y)


@dataclass
class _Loop:
    """What one fit holds while it runs: the model and its optimizer, the hooks, where it stands."""

    phase: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    hooks: List[TrainHook]
    steps_per_epoch: int
    total_steps: int
    checkpoint: Optional[Path]  # None: no checkpoints (the Python API's retraining)
    extra: Dict[str, Any] = field(default_factory=dict)
    step: int = 0
    metrics: Dict[str, float] = field(default_factory=dict)  # the last epoch's: a resumed run returns them too

    def restore(self, saved: Dict[str, Any]) -> None:
        """Continue a checkpoint of this phase at its step: it ends where an uninterrupted run would."""
        steps = saved.get("steps_per_epoch", self.steps_per_epoch)  # checkpoints before it was stored: trusted
        if steps != self.steps_per_epoch:  # the saved step would land in another epoch, at another batch
            raise ConfigError(
                f"trainer.resume=true: the checkpoint's run had {steps} batches an epoch, this one has "
                f"{self.steps_per_epoch}; resume with the data.batch_size and data.drop_last it ran with"
            )
        for hook in self.hooks:  # first: a hook names the config key that differs before a shape mismatch would
            hook.load_state_dict(saved["hooks"].get(hook.name, {}))
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        checkpoints.set_rng_state(saved["rng"])
        self.step = saved["step"]
        self.metrics = dict(saved.get("metrics", {}))

    def save(self) -> None:
        if self.checkpoint is None:
            return
        checkpoints.save(
            {
                "phase": self.phase,
                "step": self.step,
                "steps_per_epoch": self.steps_per_epoch,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "hooks": {h.name: h.state_dict() for h in self.hooks},
                "rng": checkpoints.rng_state(),
                "extra": self.extra,
                "metrics": self.metrics,
            },
            self.checkpoint,
        )

    def stopped(self) -> StopRequested:
        return StopRequested(
            f"SIGTERM during {self.phase} training: saved step {self.step} of {self.total_steps} to "
            f"{self.checkpoint}; trainer.resume=true continues from there"
        )


def _start(
    phase: str,
    model: nn.Module,
    hooks: List[TrainHook],
    cfg: TrainerConfig,
    lr: float,
    steps_per_epoch: int,
    total_steps: int,
    checkpoint: Optional[Path],
    extra: Optional[Dict[str, Any]],
) -> _Loop:
    """The hooks told the schedule, then the optimizer (after them: they may re-parametrize the weights)."""
    for hook in hooks:
        hook.on_fit_start(model, steps_per_epoch, total_steps)
    optimizer = make_optimizer(model.parameters(), cfg, lr)
    scheduler = make_scheduler(optimizer, cfg, total_steps)
    return _Loop(phase, model, optimizer, scheduler, hooks, steps_per_epoch, total_steps, checkpoint, extra or {})


def fit(
    model: nn.Module,
    train: Batches,
    val: Optional[Batches],
    cfg: TrainerConfig,
    *,
    phase: str,
    epochs: int,
    lr: float,
    hooks: List[TrainHook],
    checkpoint: Optional[Path],
    loss: Optional[LossFn] = None,
    extra: Optional[Dict[str, Any]] = None,
    resume_from: Optional[Dict[str, Any]] = None,
    log: Optional[LogFn] = None,
    step_offset: int = 0,
    paused: Callable[[], float] = lambda: 0.0,
) -> Dict[str, float]:
    """Train ``epochs`` epochs with ``hooks``; score ``val`` every ``cfg.eval_every`` epochs (None: no
    scores); checkpoint to ``checkpoint`` as it goes (None: no checkpoints).

    ``train`` and ``val``: ``data.Batches``, or ``loaders.Loader`` over a DataLoader.

    ``loss`` (default: cross-entropy with ``cfg.label_smoothing``); ``resume_from``: a checkpoint of this
    same phase to continue; ``extra`` rides along in checkpoints (e.g. an earlier phase's accuracy);
    ``step_offset`` shifts logged steps so phases follow each other on one axis; ``paused()``: seconds
    the loop has spent waiting on something else so far (left out of the step time). Returns the
    last epoch's metrics.
    """
    log = log or (lambda metrics, step: None)
    steps_per_epoch = len(train)
    loop = _start(phase, model, hooks, cfg, lr, steps_per_epoch, epochs * steps_per_epoch, checkpoint, extra)
    if resume_from is not None:
        loop.restore(resume_from)
    step_fn = _step_fn(model, cfg, loss or cross_entropy(cfg), loop)
    model.train()
    with _stop_on_sigterm(phase) as stop:
        for epoch in range(loop.step // steps_per_epoch, epochs):
            started, paused_before = time.perf_counter(), paused()
            first = _train_epoch(loop, train, epoch, epochs, cfg, step_fn, stop, log, step_offset)
            if train.device.type == "cuda":
                torch.cuda.synchronize(train.device)
            # Training time only (no evaluation, no pauses for another job's benchmark): phases compare
            # per step, e.g. the cost of QAT.
            paused_s = paused() - paused_before
            epoch_s = time.perf_counter() - started - paused_s
            loop.metrics = {
                f"{phase}/epoch": epoch + 1,
                f"{phase}/epoch_s": epoch_s,
                f"{phase}/paused_s": paused_s,
                f"{phase}/step_ms": 1e3 * epoch_s / max(steps_per_epoch - first, 1),
                **_score(loop, val, epoch, epochs, cfg),
            }
            log(loop.metrics, step_offset + loop.step)
            stopping = bool(stop)  # read once: a SIGTERM from here on is the next step's to handle
            if stopping or _checkpoint_due(epoch, epochs, loop.step, cfg):
                loop.save()
            if stopping:
                break
        if stop:  # at an epoch's end, or after the last epoch's check: the step is saved either way
            raise loop.stopped()
    for hook in hooks:
        hook.on_fit_end(model)
    return loop.metrics


def _step_fn(
    model: nn.Module, cfg: TrainerConfig, loss: LossFn, loop: _Loop
) -> Callable[[Tensor, Tensor, torch.device], Tensor]:
    """One optimizer step on a batch (hooks around it); returns the loss, on the device."""
    # Static shapes: the epoch's short last batch gets its own graph instead of a symbolic batch size.
    forward = torch.compile(model, mode=cfg.compile_mode, dynamic=False) if cfg.compile else model
    # CUDA-graph modes reuse their output memory: each step must be marked as a new one.
    graphed = cfg.compile and cfg.compile_mode in ("reduce-overhead", "max-autotune")

    def step(x: Tensor, y: Tensor, device: torch.device) -> Tensor:
        if graphed:
            torch.compiler.cudagraph_mark_step_begin()
        with _autocast(device, cfg.amp):
            value = loss(forward(x), y, x)
        loop.optimizer.zero_grad(set_to_none=True)
        value.backward()
        for hook in loop.hooks:
            hook.before_step(loop.step, model)
        loop.optimizer.step()
        loop.scheduler.step()
        loop.step += 1
        for hook in loop.hooks:
            hook.after_step(loop.step, model)
        return value

    return step


def _train_epoch(
    loop: _Loop,
    train: Batches,
    epoch: int,
    epochs: int,
    cfg: TrainerConfig,
    step_fn,
    stop: List[int],
    log: LogFn,
    step_offset: int,
) -> int:
    """The epoch's steps from where the loop stands; returns the step within the epoch it started at."""
    first = loop.step - epoch * loop.steps_per_epoch
    bar = tqdm(
        train.epoch(epoch, first),
        total=loop.steps_per_epoch,
        initial=first,
        leave=False,
        desc=f"{loop.phase} {epoch + 1}/{epochs}",
        disable=not cfg.progress,
        dynamic_ncols=True,
    )
    for x, y in bar:
        value = step_fn(x, y, train.device)
        if loop.step % 10 == 0 or loop.step == loop.total_steps:
            loss_value = value.item()
            bar.set_postfix(loss=f"{loss_value:.3f}")
            log(
                {f"{loop.phase}/loss": loss_value, f"{loop.phase}/lr": loop.scheduler.get_last_lr()[0]},
                step_offset + loop.step,
            )
        # A save due at the end of an epoch comes after its evaluation (in fit).
        if loop.step % loop.steps_per_epoch and (
            stop or cfg.checkpoint_every and loop.step % cfg.checkpoint_every == 0
        ):
            loop.save()
            if stop:
                raise loop.stopped()
    return first


def _score(loop: _Loop, val: Optional[Batches], epoch: int, epochs: int, cfg: TrainerConfig) -> Dict[str, float]:
    """The epoch's hook metrics, and the held-out accuracy (with the hooks' own) at the scored epochs."""
    metrics: Dict[str, float] = {}
    scored = val is not None and evaluation_due(epoch, epochs, cfg.eval_every)
    if scored:
        metrics[f"{loop.phase}/acc"] = evaluate(loop.model, val, cfg.amp)
    for hook in loop.hooks:
        metrics.update(hook.on_epoch_end(epoch, loop.model))
        if scored:
            metrics.update(hook.on_evaluate(epoch, loop.model))
    return metrics


def _checkpoint_due(epoch: int, epochs: int, step: int, cfg: TrainerConfig) -> bool:
    return (
        (epoch + 1) % cfg.checkpoint_epochs == 0
        or epoch + 1 == epochs
        or bool(cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
    )
