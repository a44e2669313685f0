"""``sparsebench-bench``: the kernel grid (layers x batches x sparsities x bit widths, no training), a Hydra app.

    sparsebench-bench                                   # VGG-16-CIFAR layers, 80..98%, fp32/8/4 bits, batch 1
    sparsebench-bench layers=resnet50 bench=full        # ResNet-50 layers at batch 1, 32, 128
    sparsebench-bench model=vgg16 data=cifar10          # a model config's conv/linear layers at the data's size
    sparsebench-bench grid.sparsities=[0.9] grid.bits=[32] backend=direct_sparse_fp16
    sparsebench-bench -m bench.batch_sizes=[1],[32]     # multirun: one run directory per job

Writes ``bench.csv`` (one row per layer x backend x batch x sparsity x bits), ``metrics.json``
(geomean speedups) and ``manifest.json`` into the run directory, prints a compact table, and
logs a W&B table and summary with ``logger=wandb``. This module is the app (schema, checks, wiring);
the grid's work is bench/grid_run.py.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from sparsebench.bench.config import BackendConfig, BenchConfig, validate_bench
from sparsebench.config import DataConfig, LoggerConfig, ModelConfig, refuse_unknown_keys
from sparsebench.errors import ConfigError, require
from sparsebench.hydra_app import CONF_DIR, run_checked

VALUE_BITS = (32, 16, 8, 4, 2)


@dataclass
class LayerShape:
    name: str = "layer"
    kind: str = "conv2d"  # conv2d | linear
    c_in: int = 1
    c_out: int = 1
    kernel: int = 3
    hw: int = 1  # input height = width
    stride: int = 1
    padding: Optional[int] = None  # None: kernel // 2


@dataclass
class LayerSet:
    name: str = "custom"
    layers: List[LayerShape] = field(default_factory=list)


@dataclass
class GridConfig:
    sparsities: List[float] = field(default_factory=lambda: [0.8, 0.9, 0.95, 0.98])
    bits: List[int] = field(default_factory=lambda: [32, 8, 4])
    row_skew: float = 0.0  # 0: uniform random masks; > 0: lognormal row lengths (sigma), like trained layers


@dataclass
class GridAppConfig:
    backend: BackendConfig = field(default_factory=BackendConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    layers: Optional[LayerSet] = None
    model: Optional[ModelConfig] = None
    data: Optional[DataConfig] = None
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    grid: GridConfig = field(default_factory=GridConfig)
    name: str = "bench"
    seed: int = 0


ConfigStore.instance().store(name="grid_schema", node=GridAppConfig)


def validate(cfg: GridAppConfig, overrides: Sequence[str] = ()) -> None:
    refuse_unknown_keys(cfg, GridAppConfig)
    validate_bench(cfg.backend, cfg.bench)
    s = cfg.grid
    require(
        len(s.sparsities) >= 1 and all(0 <= x < 1 for x in s.sparsities),
        "grid.sparsities",
        list(s.sparsities),
        "a non-empty list of fractions in [0, 1)",
    )
    require(
        len(s.bits) >= 1 and all(b in VALUE_BITS for b in s.bits),
        "grid.bits",
        list(s.bits),
        "a non-empty list from 32 (fp32 values), 16 (fp16 values), 8, 4, 2 (linear codes)",
    )
    require(s.row_skew >= 0, "grid.row_skew", s.row_skew, "a number >= 0 (0: every row about as long)")
    explicit_layers = any(o.split("=")[0].lstrip("+~") == "layers" for o in overrides)
    if cfg.model is not None:
        require(
            not explicit_layers,
            "layers",
            cfg.layers.name if cfg.layers else None,
            "not together with model=...: give either a layer set or a model config",
        )
        from sparsebench.models import MODELS  # late: the registry imports torch

        require(cfg.model.name in MODELS, "model.name", cfg.model.name, "one of " + ", ".join(sorted(MODELS)))
        require(cfg.data is not None, "data", None, "a dataset (data=cifar10, ...) for the model's input size")
    else:
        require(
            cfg.layers is not None and len(cfg.layers.layers) >= 1,
            "layers",
            None,
            "a layer set (layers=vgg16_cifar, resnet50, tiny) or model=<name>",
        )
        for i, layer in enumerate(cfg.layers.layers):
            key = f"layers.layers[{i}]"
            require(layer.kind in ("conv2d", "linear"), f"{key}.kind", layer.kind, "conv2d or linear")
            require(
                min(layer.c_in, layer.c_out, layer.kernel, layer.hw, layer.stride) >= 1,
                key,
                OmegaConf.to_container(layer),
                "c_in, c_out, kernel, hw and stride all >= 1",
            )


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="grid")
def app(cfg: DictConfig) -> Optional[float]:
    from sparsebench.bench.grid_run import grid_main  # late: --help and Hydra's own errors never import torch

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN

    try:
        grid_main(cfg, Path(hc.runtime.output_dir), hc.overrides.task)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        if multirun:
            return None
        sys.exit(2)
    return None


def main() -> None:
    run_checked(app, "grid")


if __name__ == "__main__":
    main()
