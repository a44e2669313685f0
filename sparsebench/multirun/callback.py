"""The end of a sweep, in the launching process: the report, and the exit status."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from sparsebench.rundir import is_shared_dense

log = logging.getLogger("sparsebench")


def own_jobs(
    rows: Sequence[Dict[str, Any]], task_overrides: Sequence[str], sweeper_params: Optional[Dict[str, Any]] = None
) -> List[Dict[str, Any]]:
    """The report rows of the jobs this sweep launched, and the shared dense models in the folder.

    Sweeps may share a folder (and its dense model). A job is this sweep's when its recorded
    overrides are one of the combinations this sweep gives its jobs: its command line, after
    `hydra.sweeper.params` for the keys the command line leaves alone, written as Hydra's basic
    sweeper writes each job's `overrides.yaml`. Another sweep's job, finished or still running,
    differs in a key or a value. A job without recorded overrides counts as this sweep's.
    """
    parser = OverridesParser.create()
    lines = [f"{k}={v}" for k, v in (sweeper_params or {}).items()] + list(task_overrides)
    allowed: Dict[str, Optional[set]] = {}  # None: any value (an interval, a glob)
    for o in parser.parse_overrides(lines):  # the command line comes last and wins, as in the sweeper
        key = o.get_key_element()
        try:
            values = o.sweep_string_iterator() if o.is_sweep_override() else [o.get_value_element_as_str()]
            allowed[key] = {f"{key}={v}" for v in values}
        except HydraException:
            allowed[key] = None
    mine = []
    for row in rows:
        recorded = row.get("_overrides") or []
        try:
            ran = {parser.parse_override(line).get_key_element(): line for line in recorded}
        except HydraException:
            ran = {}
        if (
            is_shared_dense(row["job"])
            or not ran
            or (set(ran) == set(allowed) and all(v is None or ran[k] in v for k, v in allowed.items()))
        ):
            mine.append(row)
    return mine


class SweepReport(Callback):
    """At the end of a multirun: write summary.csv + report.html; exit with status 1 if a job failed.

    The exit is a SystemExit raised here (Hydra passes it on, as it turns a callback's Exception into a
    warning): the launching process ends with the sweep's outcome, nothing else has to carry it."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        from sparsebench import report  # late: matplotlib is only needed here

        sweep_dir = Path(str(config.hydra.sweep.dir))
        rows = report.collect(sweep_dir)  # the report covers the folder: every sweep that wrote into it
        params = OmegaConf.select(config, "hydra.sweeper.params")
        try:
            mine = own_jobs(rows, list(config.hydra.overrides.task), OmegaConf.to_container(params) if params else None)
        except Exception as e:  # Hydra turns a callback's exception into a warning: count every job instead
            log.error(
                "sweep: could not tell this sweep's jobs from others' (%s: %s); counting all", type(e).__name__, e
            )
            mine = rows
        if len(mine) < len(rows):
            log.info(
                "sweep: %d of the %d jobs in %s are another sweep's (other values); not counted here",
                len(rows) - len(mine),
                len(rows),
                sweep_dir,
            )
        failed = [
            str(r["num"] if r["num"] is not None else r["job"])  # by job number (the report orders by values)
            for r in sorted(mine, key=lambda r: (r["num"] is None, r["num"] or 0))
            if r["status"] != "ok"
        ]
        if self.enabled and rows:
            try:
                report.write_report(sweep_dir, rows)
            except Exception as e:  # a plotting problem must not hide the sweep's own outcome
                log.error("could not write the sweep report: %s: %s", type(e).__name__, e)
        where = f"{sweep_dir}/report.html" if self.enabled else str(sweep_dir)
        if self.enabled and rows:
            from sparsebench.report import markdown_table  # late: matplotlib, as above

            print(markdown_table(mine), flush=True)
        if not failed:
            log.info("sweep: all %d jobs ok; see %s", len(mine), where)
            return
        print(
            f"sweep: {len(failed)} of {len(mine)} jobs failed (job {', '.join(failed)}); see {where}", file=sys.stderr
        )
        raise SystemExit(1)
