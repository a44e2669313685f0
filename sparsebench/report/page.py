"""The report's files (summary.csv, table.md, report.html with its plots inlined, plots/*.png), the
optional W&B run, and the ``sparsebench-report`` command."""

from __future__ import annotations

import argparse
import base64
import html
import io
import re
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from sparsebench.report.jobs import applies, as_float, collect, split_override, swept_keys
from sparsebench.report.plots import Section, sections
from sparsebench.report.tables import markdown_table, summary_columns, write_summary
from sparsebench.rundir import atomic_write_bytes

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px;color:#222;max-width:1240px}
h1{font-size:22px;margin-bottom:4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
.meta{color:#555;font-size:13px} .note{color:#555;font-style:italic;font-size:13px}
img{max-width:100%;height:auto;border:1px solid #eee}
table{border-collapse:collapse;font-size:12px;margin-top:8px}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:right}
th{background:#f4f4f4;position:sticky;top:0;text-align:center} td.l{text-align:left} tr.failed td{background:#fdecea}
.err{color:#b00020;text-align:left;min-width:260px;max-width:420px;overflow-wrap:anywhere}
.wide{overflow-x:auto;max-width:100%}
"""


def _cell(value: Any) -> str:
    x = as_float(value) if not isinstance(value, bool) else None
    if x is None:
        return "" if value is None else str(value)
    if isinstance(value, int) or x.is_integer() and abs(x) >= 1:
        return f"{int(x):,}"
    return f"{x:.4g}"


def render_html(sweep_dir: Path, rows: Sequence[Dict[str, Any]], parts: Sequence[Section]) -> str:
    columns = [c for c in summary_columns(rows) if c not in ("job", "overrides", "prune_method", "quant_method")]
    columns = [c for c in columns if any(r.get(c) not in (None, "") for r in rows)]
    failed = sum(r["status"] != "ok" for r in rows)
    swept = set(swept_keys(rows))
    jobs = [r for r in rows if r.get("num") is not None] or rows
    common = sorted(
        {
            o
            for r in jobs
            for o in r["_overrides"]
            if split_override(o)[0] not in swept and all(o in x["_overrides"] for x in jobs)
        }
    )
    out = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>sparsebench sweep {html.escape(sweep_dir.name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>sparsebench sweep report: {html.escape(sweep_dir.name)}</h1>",
        f"<p class='meta'>{html.escape(str(sweep_dir.resolve()))}<br>{len(rows)} jobs, {len(rows) - failed} ok, "
        f"{failed} failed &middot; swept: {html.escape(', '.join(sorted(swept)) or 'nothing')} &middot; "
        f"shared overrides: {html.escape(' '.join(common) or 'none')} &middot; written "
        f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}</p>",
    ]
    for part in parts:
        out.append(f"<h2>{html.escape(part.title)}</h2>")
        if part.png:
            b64 = base64.b64encode(part.png).decode("ascii")
            out.append(f"<img alt='{html.escape(part.title)}' src='data:image/png;base64,{b64}'>")
        if part.note:
            out.append(f"<p class='note'>{html.escape(part.note)}</p>")
    out.append(
        "<h2>Jobs</h2><div class='wide'><table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr>"
    )
    for r in rows:
        cells = []
        for c in columns:
            cls = "err" if c == "error" else "l" if c in ("status", "method") or c in swept else ""
            value = r.get(c) if c not in swept or applies(r, c) else None
            cells.append(f"<td class='{cls}'>{html.escape(_cell(value))}</td>")
        out.append(f"<tr class='{html.escape(r['status'])}'>{''.join(cells)}</tr>")
    out.append(
        "</table></div><p class='meta'>All numbers also in summary.csv beside this page; one folder per job "
        "with metrics.json, layers.csv and manifest.json.</p></body></html>\n"
    )
    return "\n".join(out)


def plot_filename(index: int, title: str) -> str:
    """``03-accuracy-speedup-pareto-front.png``: ordered as on the page, named after the plot."""
    return f"{index:02d}-{re.sub(r'[^a-z0-9]+', '-', title.lower()).strip('-')}.png"


def write_report(sweep_dir: Path, rows: Optional[List[Dict[str, Any]]] = None) -> List[Section]:
    """Write DIR/summary.csv, DIR/table.md, DIR/report.html and the page's figures as
    DIR/plots/*.png (for papers and docs), each file atomically; return the plot sections."""
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir) if rows is None else rows
    write_summary(sweep_dir / "summary.csv", rows)
    atomic_write_bytes(sweep_dir / "table.md", markdown_table(rows).encode())
    parts = sections(rows)
    for index, part in enumerate(parts, 1):
        if part.png:
            atomic_write_bytes(sweep_dir / "plots" / plot_filename(index, part.title), part.png)
    atomic_write_bytes(sweep_dir / "report.html", render_html(sweep_dir, rows, parts).encode())
    return parts


def log_wandb(
    sweep_dir: Path,
    rows: Sequence[Dict[str, Any]],
    parts: Sequence[Section],
    *,
    mode: str,
    project: str,
    entity: Optional[str],
) -> str:
    """One W&B run (job_type=report, grouped with the sweep's jobs) holding the summary table and the plots."""
    import wandb  # optional: only --wandb needs it
    from PIL import Image

    columns = summary_columns(rows)
    run = wandb.init(
        project=project,
        entity=entity,
        mode=mode,
        dir=str(sweep_dir),
        group=sweep_dir.name,
        job_type="report",
        name=f"report/{sweep_dir.name}",
        reinit="finish_previous",
        settings=wandb.Settings(console="off", silent=True),
    )
    try:
        table = wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows], allow_mixed_types=True)
        images = {f"plots/{p.title}": wandb.Image(Image.open(io.BytesIO(p.png))) for p in parts if p.png}
        run.log({"summary": table, **images})
        run.summary.update({"jobs": len(rows), "jobs_failed": sum(r["status"] != "ok" for r in rows)})
        return run.dir
    finally:
        run.finish()


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="sparsebench-report", description="Summarize a sweep directory into summary.csv and report.html."
    )
    parser.add_argument("dir", type=Path, help="a sweep directory, e.g. multirun/default/2026-11-28_12-00-00")
    parser.add_argument("--wandb", action="store_true", help="also log the summary table and plots to W&B")
    parser.add_argument(
        "--wandb-mode",
        default="offline",
        choices=("offline", "online"),
        help="offline (default): files under DIR/wandb, upload later with `wandb sync`",
    )
    parser.add_argument("--project", default="sparsebench", help="W&B project (default: sparsebench)")
    parser.add_argument("--entity", default=None, help="W&B entity (user or team); default: yours")
    args = parser.parse_args(argv)

    if not args.dir.is_dir():
        print(
            f"error: DIR={str(args.dir)!r} is not a directory: give a sweep directory such as multirun/<name>/<time>",
            file=sys.stderr,
        )
        sys.exit(2)
    rows = collect(args.dir)
    if not rows:
        print(
            f"error: DIR={str(args.dir)!r} holds no job folders (subfolders with .hydra/): give the "
            f"directory of a sweep (multirun/<name>/<time>) or of one run",
            file=sys.stderr,
        )
        sys.exit(2)
    parts = write_report(args.dir, rows)
    failed = sum(r["status"] != "ok" for r in rows)
    print(f"summary: {args.dir / 'summary.csv'} ({len(rows)} jobs, {failed} failed; as Markdown: table.md)")
    print(f"report:  {args.dir / 'report.html'} (figures also in {args.dir / 'plots'}/)")
    if args.wandb:
        where = log_wandb(args.dir, rows, parts, mode=args.wandb_mode, project=args.project, entity=args.entity)
        print(f"wandb:   {where}")
