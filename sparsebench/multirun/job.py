"""One job of the app, single run or a sweep's: its GPU, its relaunch checks, its shared dense model,
and how a failure ends it (a single run exits, a sweep records it and goes on)."""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional

import torch
from hydra.types import RunMode

from sparsebench.errors import ConfigError, StopRequested
from sparsebench.multirun import dense, gpus, naming, relaunch
from sparsebench.track import result_lines

if TYPE_CHECKING:  # annotations only: no import at run time
    from sparsebench.config import Config

log = logging.getLogger("sparsebench")

RunFn = Callable[..., Dict[str, Any]]  # experiment.run(cfg, run_dir, overrides, gpu_share=...)


def run_job(cfg: Config, hc: Any, run: RunFn) -> Optional[float]:
    """Run the job Hydra composed (``hc``: its HydraConfig); the sweeper's objective is the final accuracy on the
    validation split (the test set's when the run has none: data.val_fraction=0)."""
    multirun = hc.mode == RunMode.MULTIRUN
    sweep_dir = Path(hc.sweep.dir) if multirun else None
    naming.job_defaults(cfg, hc.overrides.task, sweep_dir)
    n_gpus = torch.cuda.device_count() if multirun and cfg.trainer.device != "cpu" else 0
    job_num = hc.job.num if multirun else 0  # hydra.job.num is unset in a single run
    run_dir = Path(hc.runtime.output_dir)
    with gpus.claim_gpu(n_gpus, job_num) as gpu:
        if n_gpus > 1:
            torch.cuda.set_device(gpu)
            log.info("job %s runs on cuda:%d", job_num, gpu)
        try:
            resuming_sweep = multirun and cfg.trainer.resume
            if resuming_sweep:  # a sweep continued where it stopped: finished jobs are kept
                finished = relaunch.finished_job(cfg, run_dir)
                if finished is not None:
                    log.info("job %s finished in an earlier launch; kept as it is (%s)", job_num, run_dir)
                    return objective(finished)
            elif cfg.trainer.resume:  # a single run continues only with the config it ran with
                relaunch.check_relaunch(cfg, run_dir, "hydra.run.dir")
            if cfg.trainer.init_from == dense.SHARED:  # one dense pre-training for the whole sweep
                if sweep_dir is None:
                    raise ConfigError(
                        "trainer.init_from=shared needs a multirun (-m): it shares one dense model "
                        "between the jobs of a sweep; give a dense.pt path for a single run"
                    )
                cfg.trainer.init_from = dense.shared_dense(cfg, sweep_dir, run)  # resumed, if asked
            if resuming_sweep:
                relaunch.resume_or_start(cfg, run_dir, job_num)  # a job without a checkpoint starts afresh
            # Jobs may share a GPU (n_jobs above the GPU count): they train together, benchmark alone.
            with gpus.GpuShare(gpu) if gpu is not None else nullcontext() as share:
                metrics = run(cfg, run_dir, hc.overrides.task, gpu_share=share)
            if not multirun:  # a sweep prints its table at the end instead
                print("\n".join(result_lines(metrics, run_dir)), flush=True)
            return objective(metrics)
        except StopRequested as e:
            if "joblib" in str(hc.launcher.get("_target_", "")).lower():
                # A joblib worker would wait for more work, holding the sweep's pipes and its GPU memory.
                print(f"stopped: {e}", file=sys.stderr, flush=True)
                logging.shutdown()
                os._exit(128 + signal.SIGTERM)
            raise
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            if not multirun:
                sys.exit(2)
            relaunch.record_failure(run_dir, e)  # this job is recorded as failed; the sweep goes on
        except Exception as e:
            if not multirun:
                raise
            relaunch.record_failure(run_dir, e)
            log.error("job %s failed (recorded in its metrics.json):\n%s", job_num, traceback.format_exc())
            if torch.cuda.is_available():  # after an out-of-memory, give the next job its memory back
                torch.cuda.empty_cache()
    return None


def objective(metrics: Dict[str, Any]) -> Optional[float]:
    """What a search sweeper maximises: a choice, so the validation split's accuracy where there is one."""
    return metrics.get("acc_val_final", metrics.get("acc_final"))
