"""``sparsebench`` / ``python -m sparsebench``: the Hydra app. Nothing but wiring."""

from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from sparsebench.config import register_schema
from sparsebench.errors import ConfigError

# Installed wheels carry the configs inside the package; a source checkout has them at the top.
_HERE = Path(__file__).resolve().parent
CONF_DIR = str(next((p for p in (_HERE / "conf", _HERE.parent / "conf") if p.is_dir()), _HERE / "conf"))
log = logging.getLogger("sparsebench")

register_schema()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def app(cfg: DictConfig) -> Optional[float]:
    from sparsebench.experiment import run  # late: keeps --help and config errors fast

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    try:
        metrics = run(cfg, Path(hc.runtime.output_dir), hc.overrides.task)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        if multirun:  # this job is recorded as failed; the sweep goes on
            return None
        sys.exit(2)
    except Exception:
        if not multirun:
            raise
        log.error("job %s failed (recorded in its metrics.json):\n%s", hc.job.num, traceback.format_exc())
        return None
    return metrics.get("acc_final")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
