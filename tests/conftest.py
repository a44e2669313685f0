"""Shared test helpers: compose configs like the CLI does, run the app in a process of its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from tests import cli_process

ROOT = Path(__file__).resolve().parents[1]

# Settings that keep end-to-end runs to a few seconds on a 2-core CPU.
TINY = ["logger=none", "trainer.progress=false", "trainer.epochs=1", "model.width=0.25"]
# TINY plus a dense fp32 model and no benchmark: tests of the plain training pipeline.
DENSE = [*TINY, "prune=none", "quant=none", "bench=none"]


def compose(*overrides: str):
    """The config the CLI would build for these overrides (schema-checked by OmegaConf)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from sparsebench.__main__ import CONF_DIR  # importing the app registers its schema and resolvers

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides), return_hydra_config=False)


def cli_env(**extra: str) -> Dict[str, str]:
    """The environment the suite runs the command lines in."""
    return {**os.environ, "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0", "PYTHONPATH": str(ROOT), **extra}


def run_cli(*args: str, cwd: Path = ROOT, timeout: int = 600, fresh: bool = False) -> subprocess.CompletedProcess:
    """``sparsebench ARGS`` as a user would run it: in a process of its own, forked from one that has the
    imports done (tests/cli_process.py); ``fresh``: ``python -m sparsebench`` in a new interpreter."""
    if not fresh:
        return cli_process.run("sparsebench", list(args), cwd, cli_env(), timeout)
    return subprocess.run(
        [sys.executable, "-m", "sparsebench", *args],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The suite's models are tiny: a second thread gains nothing and costs 3x on a shared CPU
    (the app's own default is trainer.cpu_threads=1 for the same reason)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def kernel_defaults():
    """Every test starts and ends with the kernels' default knobs and autotuning off (the library's
    default); the benchmark turns autotuning on process-wide, which must not leak into the next test."""
    from sparsebench.sparse import ops

    def reset():
        ops.set_autotune(False)
        if ops._C is not None:
            ops._C.set_tuning()

    reset()
    yield
    reset()


def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
