"""``sparsebench-report DIR``: one sweep -> ``DIR/summary.csv``, ``DIR/table.md`` and a self-contained
``DIR/report.html`` (with its figures also as ``DIR/plots/*.png``).

A sweep directory (``multirun/<name>/<time>``) holds one subfolder per job with Hydra's
``.hydra/`` and, once the job ended, ``metrics.json`` (+ ``layers.csv``). A job without
metrics.json died before it could write one (killed, out of memory) and counts as failed.
Plots are PNGs made with matplotlib's Agg canvas and inlined as base64, so the page needs
no other file and no network.

- ``jobs``: reading the job folders into rows, and what every table and plot shares;
- ``tables``: summary.csv and table.md;
- ``plots``: the figures;
- ``page``: the files, the W&B run and the command.
"""

from sparsebench.report.jobs import (
    DIED,
    applies,
    collect,
    job_label,
    read_curves,
    read_job,
    read_layer_speedups,
    swept_keys,
    unique_labels,
)
from sparsebench.report.page import log_wandb, main, plot_filename, render_html, write_report
from sparsebench.report.plots import (
    Section,
    pareto_front,
    plot_accuracy,
    plot_curves,
    plot_footprint,
    plot_layer_heatmaps,
    plot_pareto,
    plot_speedups,
    primary_speedup,
    sections,
)
from sparsebench.report.tables import markdown_table, summary_columns, write_summary

__all__ = [
    "DIED",
    "Section",
    "applies",
    "collect",
    "job_label",
    "log_wandb",
    "main",
    "markdown_table",
    "pareto_front",
    "plot_accuracy",
    "plot_curves",
    "plot_filename",
    "plot_footprint",
    "plot_layer_heatmaps",
    "plot_pareto",
    "plot_speedups",
    "primary_speedup",
    "read_curves",
    "read_job",
    "read_layer_speedups",
    "render_html",
    "sections",
    "summary_columns",
    "swept_keys",
    "unique_labels",
    "write_report",
    "write_summary",
]
