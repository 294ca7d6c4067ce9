"""Sweep reports: read a sweep folder, aggregate over seeds, write ``REPORT.md`` and PNG figures, and
optionally publish the same panels as a wandb report.

    load_sweep(dir)  -> Sweep (runs.py)        every planned or present run, its status and records
    aggregate(runs)  -> [Point] (stats.py)     seeds of one (setting, loss, alpha, lr) together: mean, 95 % interval, n
    render_markdown / render_figures           REPORT.md's text (markdown.py), the PNGs (figures.py)
    wandb_report / publish_wandb               the wandb mirror (publish.py)
    write_report(dir, out)                     all of the above, offline; returns REPORT.md's path

Conventions of every number shown:
- accuracies are percentages of the run's test subset, as the run logged them: clean, and robust under
  the attack named in the record, at the run's eps (units of 1/255);
- ``initial`` and ``final`` are the strong-attack evaluations (``eval_final``: APGD-CE + APGD-T) at step 0
  and at the last step; the curves are the routine evaluations (``eval``, the weaker APGD-CE) in between;
- every accuracy carries its 95 % interval: one run's is the Wilson score interval over its n test images,
  a point of k >= 2 seeds (runs that differ only in ``run.seed``) shows the mean and the Student-t interval
  of the mean over the seeds (``stats.py``); the text claims a difference only where intervals do not overlap.

``import advft.report`` needs neither matplotlib nor wandb: figures.py imports matplotlib (Agg backend)
when drawing, publish.py imports wandb-workspaces when publishing.
"""
from __future__ import annotations

import os
from pathlib import Path

from advft.report.figures import (colour_range, plot_curves, plot_heatmaps, plot_tradeoff, render_figures,
                                  tradeoff_series)
from advft.report.markdown import render_markdown
from advft.report.publish import publish_wandb, wandb_report, wandb_unavailable
from advft.report.runs import STATUSES, ReportError, Run, Sweep, load_sweep
from advft.report.stats import Point, Stat, aggregate, apart, curve, stat, t975, wilson

REPORT_MD = "REPORT.md"
FIG_DIR = "figures"

__all__ = ["FIG_DIR", "REPORT_MD", "STATUSES", "Point", "ReportError", "Run", "Stat", "Sweep", "aggregate", "apart",
           "colour_range", "curve", "load_sweep", "plot_curves", "plot_heatmaps", "plot_tradeoff", "publish_wandb",
           "render_figures", "render_markdown", "stat", "t975", "tradeoff_series", "wandb_report", "wandb_unavailable",
           "wilson", "write_report"]


def write_report(sweep_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> Path:
    """Load the sweep, write ``<out_dir>/figures/*.png`` (removing PNGs there that this report no longer draws)
    and ``<out_dir>/REPORT.md`` (out_dir defaults to the sweep folder); return REPORT.md's path. Works offline; raises ReportError for a folder that is no sweep."""
    sweep = load_sweep(sweep_dir)
    out = Path(out_dir) if out_dir is not None else sweep.dir
    out.mkdir(parents=True, exist_ok=True)
    figures = render_figures(sweep, out / FIG_DIR)
    for stale in set((out / FIG_DIR).glob("*.png")) - set(figures):  # a layout the sweep no longer has
        stale.unlink(missing_ok=True)
    path = out / REPORT_MD
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(render_markdown(sweep, figures, out))
    os.replace(tmp, path)  # a reader (or a second report) never sees half a file
    return path
