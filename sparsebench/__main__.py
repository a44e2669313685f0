"""``sparsebench`` / ``python -m sparsebench``: the Hydra app. Nothing but wiring."""

from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path
from typing import List, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from sparsebench import sweep
from sparsebench.config import register_schema
from sparsebench.errors import ConfigError

# Installed wheels carry the configs inside the package; a source checkout has them at the top.
_HERE = Path(__file__).resolve().parent
CONF_DIR = str(next((p for p in (_HERE / "conf", _HERE.parent / "conf") if p.is_dir()), _HERE / "conf"))
log = logging.getLogger("sparsebench")

register_schema()
sweep.register_resolvers()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def app(cfg: DictConfig) -> Optional[float]:
    from sparsebench.experiment import run  # late: keeps --help and config errors fast

    import torch

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    sweep.job_defaults(cfg, hc.overrides.task, Path(hc.sweep.dir) if multirun else None)
    # Jobs running at once (joblib launcher) each take their own GPU.
    n_gpus = torch.cuda.device_count() if multirun and cfg.trainer.device != "cpu" else 0
    job_num = hc.job.num if multirun else 0  # hydra.job.num is unset in a single run
    with sweep.claim_gpu(n_gpus, job_num) as gpu:
        if n_gpus > 1:
            torch.cuda.set_device(gpu)
            log.info("job %s runs on cuda:%d", job_num, gpu)
        run_dir = Path(hc.runtime.output_dir)
        try:
            if cfg.trainer.init_from == sweep.SHARED:  # one dense pre-training for the whole sweep
                if not multirun:
                    raise ConfigError("trainer.init_from=shared needs a multirun (-m): it shares one dense "
                                      "model between the jobs of a sweep; give a dense.pt path for a single run")
                cfg.trainer.init_from = sweep.shared_dense(cfg, Path(hc.sweep.dir), run)
            metrics = run(cfg, run_dir, hc.overrides.task)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            if multirun:  # this job is recorded as failed; the sweep goes on
                sweep.record_failure(run_dir, e)
                return None
            sys.exit(2)
        except Exception as e:
            if not multirun:
                raise
            sweep.record_failure(run_dir, e)
            log.error("job %s failed (recorded in its metrics.json):\n%s", hc.job.num, traceback.format_exc())
            if torch.cuda.is_available():  # after an out-of-memory, give the next job its memory back
                torch.cuda.empty_cache()
            return None
    return metrics.get("acc_final")


def precheck(overrides: List[str]) -> Optional[str]:
    """Compose the config once up front so a bad override becomes one line, not Hydra's page."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException, MissingConfigException

    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            compose("config", overrides=overrides)
    except MissingConfigException as e:
        group, _, choice = (e.missing_cfg_file or "").rpartition("/")
        if group and e.options:
            return f"{group}={choice} is not allowed: one of {', '.join(sorted(e.options))}"
        return str(e).splitlines()[0]
    except HydraException as e:
        headline = str(e).splitlines()[0]
        if e.__cause__ is None:
            return headline
        detail = getattr(e.__cause__, "msg", None) or str(e.__cause__)
        return f"{headline}: {detail.splitlines()[0]}"
    return None


def main() -> None:
    args = sys.argv[1:]
    # Plain single runs are checked first; flags (-m, --cfg, --help) go straight to Hydra.
    plain = [a for a in args if not a.startswith(("hydra.", "hydra/", "+hydra", "~hydra"))]
    if not any(a.startswith("-") for a in args):
        problem = precheck(plain)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            sys.exit(2)
    app()
    # A multirun goes through every job, then exits 1 if any failed (SweepReport counted them).
    if sweep.LAST_SWEEP.get("failed"):
        sys.exit(1)


if __name__ == "__main__":
    main()
