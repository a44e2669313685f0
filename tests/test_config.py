"""Every config option composes and validates; bad input ends in one clear line."""

from pathlib import Path

import pytest

from sparsebench.config import validate
from sparsebench.errors import ConfigError
from tests.conftest import ROOT, compose, run_cli

GROUPS = ["data", "model", "trainer", "prune", "quant", "backend", "bench", "logger", "experiment", "weights", "debug"]


def options(group: str):
    return sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))


# Options that only make sense together with another choice.
COMPANIONS = {("backend", "none"): ["bench=none"]}


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes_and_validates(group, option):
    cfg = compose(f"{group}={option}", *COMPANIONS.get((group, option), []))
    validate(cfg)
    if group in ("data", "model"):
        assert cfg[group].name == option


def test_every_launcher_and_layer_set_composes():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from sparsebench.bench.grid import validate as validate_grid
    from sparsebench.hydra_app import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for launcher in options("hydra/launcher"):
            cfg = hydra_compose("config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
            assert cfg.hydra.launcher._target_
        for layers in options("layers"):
            grid = hydra_compose("grid", overrides=[f"layers={layers}"])
            validate_grid(grid, [f"layers={layers}"])
            assert grid.layers.name == layers and len(grid.layers.layers) >= 2


# Every experiment on the CPU in seconds: debug=quick, synthetic data of the experiment's image size.
QUICK = ["debug=quick", "data=synthetic", "data.path=null", "data.augment=true", "trainer.init_from=null"]


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_runs_in_quick_mode(experiment, tmp_path: Path):
    from sparsebench.experiment import run

    cfg = compose(f"experiment={experiment}", *QUICK)
    if str(cfg.model._target_ or "").startswith("torchvision."):
        pytest.importorskip("torchvision")
    metrics = run(cfg, tmp_path)
    assert metrics["status"] == "ok" and 0.0 <= metrics["acc_final"] <= 1.0
    assert (tmp_path / "manifest.json").is_file() and (tmp_path / "layers.csv").is_file()


def test_default_config_is_the_embedded_experiment():
    cfg = compose()
    validate(cfg)
    assert (cfg.data.name, cfg.model.name, cfg.logger.name, cfg.logger.mode) == (
        "digits",
        "convnet",
        "wandb",
        "offline",
    )


@pytest.mark.parametrize(
    "override,key",
    [
        ("trainer.epochs=-1", "trainer.epochs"),
        ("trainer.checkpoint_epochs=0", "trainer.checkpoint_epochs"),
        ("prune.final_sparsity=1.5", "prune.final_sparsity"),
        ("quant.bits=0", "quant.bits"),
        ("data.batch_size=0", "data.batch_size"),
        ("trainer.optimizer=lbfgs", "trainer.optimizer"),
        ("trainer.compile_mode=fast", "trainer.compile_mode"),
        ("model.width=0", "model.width"),
    ],
)
def test_validate_names_the_bad_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose(override))


@pytest.mark.parametrize(
    "override,expected",
    [
        ("data=nonexistent", "data=nonexistent is not allowed: one of cifar10, digits, imagefolder, mnist, synthetic"),
        ("trainer.lr=abc", "trainer.lr=abc"),
        ("quant.kmeans_per_channel=maybe", "quant.kmeans_per_channel=maybe: Value 'maybe' is not a valid bool"),
    ],
)
def test_a_bad_override_is_one_line_before_hydra_starts(override, expected):
    from sparsebench.hydra_app import precheck

    problem = precheck("config", [override])
    assert problem is not None and expected in problem and "\n" not in problem


@pytest.mark.parametrize(
    "override,expected",
    [
        ("trainer.epochs=-1", "trainer.epochs=-1 is not allowed: an integer >= 0"),  # checked inside the app
        (
            "data=nonexistent",
            "data=nonexistent is not allowed: one of cifar10, digits, imagefolder, mnist, synthetic",
        ),  # before it
    ],
)
def test_cli_bad_input_is_one_line_without_traceback(override, expected, tmp_path: Path):
    result = run_cli("logger=none", override, f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and expected in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    # Nothing was trained: no checkpoint, no dense model.
    assert not (tmp_path / "dense.pt").exists()
