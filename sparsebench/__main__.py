"""``sparsebench`` / ``python -m sparsebench``: the Hydra app. Nothing but wiring."""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from sparsebench import sweep
from sparsebench.cli import CONF_DIR, run_checked
from sparsebench.config import register_schema
from sparsebench.errors import ConfigError, StopRequested

log = logging.getLogger("sparsebench")

register_schema()
sweep.register_resolvers()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def app(cfg: DictConfig) -> Optional[float]:
    from sparsebench.experiment import run  # late: keeps --help and config errors fast
    from sparsebench.gpushare import GpuShare

    import torch

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    sweep.job_defaults(cfg, hc.overrides.task, Path(hc.sweep.dir) if multirun else None)
    # Jobs running at once (joblib launcher) each take their own GPU.
    n_gpus = torch.cuda.device_count() if multirun and cfg.trainer.device != "cpu" else 0
    job_num = hc.job.num if multirun else 0  # hydra.job.num is unset in a single run
    run_dir = Path(hc.runtime.output_dir)
    resuming_sweep = multirun and cfg.trainer.resume
    with sweep.claim_gpu(n_gpus, job_num) as gpu:
        if n_gpus > 1:
            torch.cuda.set_device(gpu)
            log.info("job %s runs on cuda:%d", job_num, gpu)
        try:
            if resuming_sweep:  # a sweep continued where it stopped: finished jobs are kept
                finished = sweep.finished_job(cfg, run_dir)
                if finished is not None:
                    log.info("job %s finished in an earlier launch; kept as it is (%s)", job_num, run_dir)
                    return finished.get("acc_final")
            elif cfg.trainer.resume:  # a single run continues only with the config it ran with
                sweep.check_relaunch(cfg, run_dir, "hydra.run.dir")
            if cfg.trainer.init_from == sweep.SHARED:  # one dense pre-training for the whole sweep
                if not multirun:
                    raise ConfigError("trainer.init_from=shared needs a multirun (-m): it shares one dense "
                                      "model between the jobs of a sweep; give a dense.pt path for a single run")
                cfg.trainer.init_from = sweep.shared_dense(cfg, Path(hc.sweep.dir), run)  # resumed, if asked
            if resuming_sweep:
                sweep.resume_or_start(cfg, run_dir, job_num)
            # Jobs may share a GPU (n_jobs above the GPU count): they train together, benchmark alone.
            with GpuShare(gpu) if gpu is not None else nullcontext() as share:
                metrics = run(cfg, run_dir, hc.overrides.task, gpu_share=share)
        except StopRequested as e:
            if "joblib" in str(hc.launcher.get("_target_", "")).lower():
                # A joblib worker would wait for more work, holding the sweep's pipes and its GPU memory.
                print(f"stopped: {e}", file=sys.stderr, flush=True)
                logging.shutdown()
                os._exit(128 + signal.SIGTERM)
            raise
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


def main() -> None:
    try:
        run_checked(app, "config")
    except StopRequested as e:  # metrics.json says so too; a sweep stops here rather than start its next job
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    # A multirun goes through every job, then exits 1 if any failed (SweepReport counted them).
    if sweep.LAST_SWEEP.get("failed"):
        sys.exit(1)


if __name__ == "__main__":
    main()
