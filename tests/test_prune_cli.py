"""Bad pruning input ends in one clear line (exit 2, the key named), before any training."""

from __future__ import annotations

import pytest

from sparsebench.errors import ConfigError
from sparsebench.experiment import run
from tests.conftest import TINY, compose, run_cli

BASE = [*TINY, "quant=none", "bench=none", "prune=agp", "trainer.finetune_epochs=2", "prune.end=1"]


@pytest.mark.parametrize(
    "overrides, key, allowed",
    [
        (
            ["prune.initial_sparsity=0.5", "prune.final_sparsity=0.3"],
            "prune.final_sparsity=0.3",
            ">= prune.initial_sparsity",
        ),
        (["prune.final_sparsity=1.0"], "prune.final_sparsity=1.0", "[0, 1)"),
        (["prune.initial_sparsity=-0.1"], "prune.initial_sparsity=-0.1", "[0, 1)"),
        (["prune.start=1", "prune.end=0.5"], "prune.end=0.5", ">= prune.start"),
        (["prune.unit=epoch", "prune.end=3"], "prune.end=3.0", "trainer.finetune_epochs (2)"),
        (["prune.end=3"], "prune.end=3.0", "a fraction of the finetune phase in [0, 1] with prune.unit=fraction"),
        (
            [r"++prune.overrides={classifier:0.5}"],
            "prune.overrides.classifier=0.5",
            "prunable layers are: block2.conv, block3.conv",
        ),
    ],
)
def test_bad_prune_input_is_refused_before_training(tmp_path, overrides, key, allowed):
    with pytest.raises(ConfigError) as refused:
        run(compose(*BASE, *overrides), tmp_path)
    assert key in str(refused.value) and allowed in str(refused.value) and "\n" not in str(refused.value)
    assert not (tmp_path / "dense.pt").exists() and not (tmp_path / "checkpoints").exists()  # nothing trained


def test_a_prune_error_from_the_cli_is_one_line(tmp_path):
    result = run_cli(*BASE, r"++prune.overrides={classifier:0.5}", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "prune.overrides.classifier=0.5" in errors[0], result.stderr[-2000:]
