#!/usr/bin/env python3
"""Time and profile the training step of a config, dense and with each compression hook.

    python scripts/profile_train_step.py model=vgg16 data=synthetic data.batch_size=256 [--steps 40] [--trace]

Runs the real loop (train.fit) on `--steps` synthetic batches per epoch for three epochs and
reports the last epoch's ms/step for: dense, pruning only, QAT only, pruning + QAT, and (asked for
with --variants) pruning + QAT distilling a dense model of the same network, or `data`: the input
pipeline alone (shuffle, augmentation, normalisation; the synthetic images are uint8 like CIFAR's,
so `data.augment=true data.cutout=16 data.trivialaugment=true` costs what it costs there). With
--trace, the first and the last variant run once more, their second epoch (compiled, warm) under
torch.profiler: the GPU's busy time per step and the heaviest ops by GPU and by CPU time are
printed. A step whose wall time exceeds its GPU time is host-bound alone; on a GPU that several
jobs share, the GPU time is what each job costs the others.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, schedule

from sparsebench.config import register_schema, validate
from sparsebench.data import load_dataset
from sparsebench.experiment import _batches, pick_device
from sparsebench.hydra_app import CONF_DIR
from sparsebench.models import build_model
from sparsebench.prune import build_pruner
from sparsebench.quant import build_quantizer
from sparsebench.train import TrainHook, fit, seed_everything


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="steps per timed epoch")
    parser.add_argument("--trace", action="store_true", help="also print a torch.profiler table")
    parser.add_argument("--variants", default="dense,prune,quant,prune+quant", help="comma-separated subset")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    register_schema()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["data=synthetic", "logger=none", "bench=none", *args.overrides])
    cfg.data.train_size = args.steps * cfg.data.batch_size
    cfg.data.test_size = cfg.data.batch_size
    cfg.trainer.progress = False
    # Pruning ramps over the first two timed epochs (masks updated once per epoch, as in the
    # paper configs); the last, timed epoch runs at the final sparsity.
    cfg.prune.unit, cfg.prune.start, cfg.prune.end, cfg.prune.frequency = "epoch", 0, 2, 1
    validate(cfg)
    device = pick_device(cfg.trainer.device)
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    data = load_dataset(cfg.data).to(device)
    channels_last = cfg.trainer.channels_last and device.type == "cuda"
    train, test = _batches(data, cfg, device, channels_last)
    print(
        f"{cfg.model.name} width {cfg.model.width}, batch {cfg.data.batch_size}, amp {cfg.trainer.amp}, "
        f"channels_last {channels_last}, compile {cfg.trainer.compile} ({cfg.trainer.compile_mode}), {device}"
    )

    def new_model() -> torch.nn.Module:
        model = build_model(
            cfg.model.name,
            in_channels=data.in_channels,
            num_classes=data.num_classes,
            image_size=data.image_size,
            width=cfg.model.width,
        ).to(device)
        return model.to(memory_format=torch.channels_last) if channels_last else model

    def model_and_hooks(prune: bool, quant: bool):
        model = new_model()
        sample = torch.zeros(1, data.in_channels, data.image_size, data.image_size, device=device)
        hooks = [
            build_pruner(cfg.prune, model, sample) if prune else None,
            build_quantizer(cfg.quant, model) if quant else None,
        ]
        return model, [h for h in hooks if h is not None]

    with tempfile.TemporaryDirectory() as tmp:

        def step_ms(prune: bool, quant: bool, distill: bool = False, epochs: int = 3, extra=()) -> float:
            model, hooks = model_and_hooks(prune, quant)
            hooks += list(extra)
            # The teacher's weights do not change its cost: an untrained dense model of the same network.
            teacher = new_model() if distill else None
            metrics = fit(
                model,
                train,
                test,
                cfg.trainer,
                phase="p",
                epochs=epochs,
                lr=cfg.trainer.lr,
                hooks=hooks,
                checkpoint=Path(tmp) / "last.pt",
                teacher=teacher,
            )
            return metrics["p/step_ms"]

        def batch_ms(epochs: int = 3) -> float:
            for epoch in range(epochs):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                started = time.perf_counter()
                for _ in train.epoch(epoch):
                    pass
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            return 1e3 * (time.perf_counter() - started) / len(train)

        variants = {
            "dense": (False, False),
            "prune": (True, False),
            "quant": (False, True),
            "prune+quant": (True, True),
            "prune+quant+distill": (True, True, True),
        }
        chosen = args.variants.split(",")
        unknown = [name for name in chosen if name not in variants and name != "data"]
        if unknown:
            parser.error(f"--variants: {', '.join(unknown)} not among data, {', '.join(variants)}")
        base = None
        for name in chosen:
            ms = batch_ms() if name == "data" else step_ms(*variants[name])
            base = base or ms
            print(
                f"{name:>19}: {ms:8.2f} ms/{'batch' if name == 'data' else 'step'}  ({ms / base:.2f}x {chosen[0]})",
                flush=True,
            )
        if args.trace:
            cfg.prune.end = 0  # one cut at the first step: the traced epoch runs at the final sparsity
            traced = [name for name in chosen if name != "data"]
            active = max(1, args.steps - 4)  # the second epoch's steps, but its first and last two
            for name in dict.fromkeys(traced[:1] + traced[-1:]):
                plan = schedule(skip_first=args.steps + 1, wait=0, warmup=1, active=active, repeat=1)
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], schedule=plan) as prof:
                    wall_ms = step_ms(*variants[name], epochs=2, extra=[_ProfilerStep(prof)])
                table = prof.key_averages()
                # Kernels and copies only: the step and compiled-graph annotations span the same time again.
                gpu_ms = (
                    sum(
                        e.self_device_time_total
                        for e in table
                        if e.device_type == DeviceType.CUDA and not e.is_user_annotation
                    )
                    / 1e3
                    / active
                )
                print(
                    f"\n== {name}: {active} warm steps: GPU busy {gpu_ms:.2f} ms/step, wall {wall_ms:.2f} ms/step; "
                    f"heaviest by GPU time"
                )
                print(table.table(sort_by="self_cuda_time_total", row_limit=15))
                print(f"== {name}: heaviest by CPU time")
                print(table.table(sort_by="self_cpu_time_total", row_limit=12))


class _ProfilerStep(TrainHook):
    """Advances the profiler's schedule once per optimizer step."""

    def __init__(self, prof: profile):
        self.prof = prof

    def after_step(self, step: int, model: torch.nn.Module) -> None:
        self.prof.step()


if __name__ == "__main__":
    main()
