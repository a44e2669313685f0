"""The training loop. It knows pruning and quantization only as ``TrainHook``s."""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from sparsebench.data import Batches
from sparsebench.distill import Distillation
from sparsebench.errors import ConfigError, StopRequested

LogFn = Callable[[Dict[str, float], int], None]


class TrainHook:
    """A plug-in of the training loop (the pruner, the quantizer).

    Call order: ``on_fit_start`` (may re-parametrize the model, before the optimizer exists)
    -> per step ``before_step`` (after backward) and ``after_step`` (after the optimizer)
    -> ``on_epoch_end`` (and ``on_evaluate`` at the epochs whose test accuracy the loop scores,
    ``trainer.eval_every``) -> ``on_fit_end``. ``state_dict`` goes into every checkpoint.
    """

    name = "hook"
    paused_s = 0.0  # seconds this hook held the loop waiting on something else (not counted as training time)

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


# ---------------------------------------------------------------- checkpoints


def atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


def make_optimizer(params: Iterable[nn.Parameter], cfg: Any, lr: float) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: Any, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
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
            raise StopRequested(f"SIGTERM during {phase} training, which then failed before it could save "
                                f"({type(e).__name__}: {e}); trainer.resume=true continues from the last "
                                f"checkpoint") from e
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stopped(phase: str, step: int, total_steps: int, checkpoint: Path) -> StopRequested:
    return StopRequested(f"SIGTERM during {phase} training: saved step {step} of {total_steps} to {checkpoint}; "
                         f"trainer.resume=true continues from there")


def fit(model: nn.Module, train: Batches, test: Batches, cfg: Any, *, phase: str, epochs: int, lr: float,
        hooks: List[TrainHook], checkpoint: Path, extra: Optional[Dict[str, Any]] = None,
        resume_from: Optional[Dict[str, Any]] = None, log: Optional[LogFn] = None,
        step_offset: int = 0, teacher: Optional[nn.Module] = None) -> Dict[str, float]:
    """Train ``epochs`` epochs with ``hooks``; checkpoint to ``checkpoint`` as it goes.

    ``resume_from`` is a checkpoint of this same phase: the loop continues at its step and
    ends exactly where an uninterrupted run would. ``extra`` rides along in checkpoints
    (e.g. the dense accuracy of an earlier phase). ``step_offset`` shifts logged steps so
    phases follow each other on one axis. With a ``teacher`` the loss also distils its outputs
    (``cfg.distill``, ``cfg.distill_temperature``). Returns the last epoch's metrics.
    """
    log = log or (lambda metrics, step: None)
    steps_per_epoch = len(train)
    total_steps = epochs * steps_per_epoch
    for hook in hooks:
        hook.on_fit_start(model, steps_per_epoch, total_steps)
    # Built after the hooks, which may re-parametrize the model's weights.
    optimizer = make_optimizer(model.parameters(), cfg, lr)
    scheduler = make_scheduler(optimizer, cfg, total_steps)
    # Static shapes: the epoch's short last batch gets its own graph instead of turning the batch
    # dimension symbolic for every step.
    train_model = torch.compile(model, mode=cfg.compile_mode, dynamic=False) if cfg.compile else model
    # CUDA-graph modes reuse their output memory: each step must be marked as a new one.
    graphed = cfg.compile and cfg.compile_mode in ("reduce-overhead", "max-autotune")
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    distill = None if teacher is None else Distillation(teacher, cfg.distill, cfg.distill_temperature, loss_fn,
                                                        cfg.compile_mode if cfg.compile else None)

    step = 0
    metrics: Dict[str, float] = {}  # the last epoch's: a run resumed from its last step returns them too
    if resume_from is not None:
        saved_steps = resume_from.get("steps_per_epoch", steps_per_epoch)  # checkpoints before it was stored: trusted
        if saved_steps != steps_per_epoch:  # the saved step would land in another epoch, at another batch
            raise ConfigError(f"trainer.resume=true: the checkpoint's run had {saved_steps} batches an epoch, this one "
                              f"has {steps_per_epoch}; resume with the data.batch_size and data.drop_last it ran with")
        for hook in hooks:  # first: a hook names the config key that differs before a shape mismatch would
            hook.load_state_dict(resume_from["hooks"].get(hook.name, {}))
        model.load_state_dict(resume_from["model"])
        optimizer.load_state_dict(resume_from["optimizer"])
        scheduler.load_state_dict(resume_from["scheduler"])
        set_rng_state(resume_from["rng"])
        step = resume_from["step"]
        metrics = dict(resume_from.get("metrics", {}))

    def save(step: int) -> None:
        atomic_torch_save({
            "phase": phase, "step": step, "steps_per_epoch": steps_per_epoch, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "hooks": {h.name: h.state_dict() for h in hooks},
            "rng": rng_state(), "extra": extra or {}, "metrics": metrics,
        }, checkpoint)

    model.train()
    with _stop_on_sigterm(phase) as stop:
        for epoch in range(step // steps_per_epoch, epochs):
            start = step - epoch * steps_per_epoch
            epoch_started, paused_before = time.perf_counter(), sum(h.paused_s for h in hooks)
            bar = tqdm(train.epoch(epoch, start), total=steps_per_epoch, initial=start, leave=False,
                       desc=f"{phase} {epoch + 1}/{epochs}", disable=not cfg.progress, dynamic_ncols=True)
            for x, y in bar:
                if graphed:
                    torch.compiler.cudagraph_mark_step_begin()
                with _autocast(train.device, cfg.amp):
                    logits = train_model(x)
                    loss = loss_fn(logits, y) if distill is None else distill(logits, y, x)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                for hook in hooks:
                    hook.before_step(step, model)
                optimizer.step()
                scheduler.step()
                step += 1
                for hook in hooks:
                    hook.after_step(step, model)
                if step % 10 == 0 or step == total_steps:
                    loss_value = loss.item()
                    bar.set_postfix(loss=f"{loss_value:.3f}")
                    log({f"{phase}/loss": loss_value, f"{phase}/lr": scheduler.get_last_lr()[0]}, step_offset + step)
                # A save due at the end of an epoch comes after its evaluation, below.
                if step % steps_per_epoch and (stop or cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                    save(step)
                    if stop:
                        raise _stopped(phase, step, total_steps, checkpoint)
            if train.device.type == "cuda":
                torch.cuda.synchronize(train.device)
            # Training time only (no evaluation, no pauses for another job's benchmark): phases
            # compare per step, e.g. the cost of QAT.
            paused_s = sum(h.paused_s for h in hooks) - paused_before
            epoch_s = time.perf_counter() - epoch_started - paused_s
            metrics = {f"{phase}/epoch": epoch + 1, f"{phase}/epoch_s": epoch_s, f"{phase}/paused_s": paused_s,
                       f"{phase}/step_ms": 1e3 * epoch_s / max(steps_per_epoch - start, 1)}
            scored = evaluation_due(epoch, epochs, cfg.eval_every)
            if scored:
                metrics[f"{phase}/acc"] = evaluate(model, test, cfg.amp)
            for hook in hooks:
                metrics.update(hook.on_epoch_end(epoch, model))
                if scored:
                    metrics.update(hook.on_evaluate(epoch, model))
            log(metrics, step_offset + step)
            stopping = bool(stop)  # read once: a SIGTERM from here on is the next step's to handle
            if (stopping or (epoch + 1) % cfg.checkpoint_epochs == 0 or epoch + 1 == epochs
                    or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)):
                save(step)
            if stopping:
                break
        if stop:  # at an epoch's end, or after the last epoch's check: the step is saved either way
            raise _stopped(phase, step, total_steps, checkpoint)
    for hook in hooks:
        hook.on_fit_end(model)
    return metrics
