"""``sparsebench`` / ``python -m sparsebench``: the Hydra app. Wiring only: the job is multirun.job's,
the experiment experiment.run's."""

from __future__ import annotations

import signal
import sys
from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from sparsebench.config import register_schema
from sparsebench.errors import StopRequested
from sparsebench.hydra_app import CONF_DIR, run_checked
from sparsebench.multirun.naming import register_resolvers

register_schema()
register_resolvers()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def app(cfg: DictConfig) -> Optional[float]:
    from sparsebench.experiment import run  # late: keeps --help and config errors fast
    from sparsebench.multirun.job import run_job

    return run_job(cfg, HydraConfig.get(), run)


def main() -> None:
    """A multirun exits 1 when a job failed (multirun.callback.SweepReport)."""
    try:
        run_checked(app, "config")
    except StopRequested as e:  # metrics.json says so too; a sweep stops here rather than start its next job
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)


if __name__ == "__main__":
    main()
