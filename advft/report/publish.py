"""The wandb mirror of the report (wandb-workspaces, imported only when publishing): the same panels,
computed by wandb from the runs' mirrored metrics (wandb group = sweep name), and the results tables."""
from __future__ import annotations

import importlib.util
import os
from typing import Any, Sequence

from advft.report.markdown import render_markdown
from advft.report.runs import Sweep
from advft.engine.record import wandb_mode


def wandb_unavailable() -> str | None:
    """Why a wandb report cannot be published from here (None when it can): package or key missing."""
    if importlib.util.find_spec("wandb_workspaces") is None:
        return "the wandb-workspaces package is not installed"
    mode = wandb_mode("auto")
    if mode != "online":
        why = (f"WANDB_MODE={os.environ['WANDB_MODE']}" if os.environ.get("WANDB_MODE")
               else "no WANDB_API_KEY and no ~/.netrc login")
        return f"wandb is {mode} here ({why})"
    return None


def wandb_report(sweep: Sweep, project: str, entity: str) -> Any:
    """The wandb-workspaces Report of the sweep (not saved), computed by wandb from the mirrored runs (group =
    sweep name): the PNGs' curves grouped by alpha, by lr and by loss (mean ± std), the final accuracies over
    loss x alpha x lr as a parallel-coordinates plot (wandb has no heatmap panel), and REPORT.md's tables as
    markdown."""
    import wandb_workspaces.reports.v2 as wr

    def runset(by: str) -> Any:
        return wr.Runset(entity=entity, project=project, name=f"{sweep.name} by {by}",
                         filters=f"Metric('Group') == '{sweep.name}'", groupby=[f"config.{by}"])

    def lines(title: str, metrics: Sequence[str], key: str) -> list[Any]:
        return [wr.LinePlot(title=f"{title} by {key.split('.')[-1]}", x="Step", y=list(metrics),
                            groupby=wr.Config(key), groupby_aggfunc="mean", groupby_rangefunc="stddev")]

    grids = []
    for key in ("loss.alpha", "optim.lr", "loss.name"):
        panels = (lines("clean accuracy", ["eval/clean_acc"], key) + lines("robust accuracy", ["eval/robust_acc"], key)
                  + lines("adversarial loss", ["train/adv_loss"], key) + lines("clean loss", ["train/clean_loss"], key))
        grids.append(wr.PanelGrid(runsets=[runset(key)], panels=panels))
    final = wr.PanelGrid(runsets=[runset("loss.alpha")], panels=[wr.ParallelCoordinatesPlot(
        title="final accuracy over alpha x lr",
        columns=[wr.ParallelCoordinatesPlotColumn(metric=wr.Config("loss.name")),
                 wr.ParallelCoordinatesPlotColumn(metric=wr.Config("loss.alpha")),
                 wr.ParallelCoordinatesPlotColumn(metric=wr.Config("optim.lr")),
                 wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric("final/clean_acc")),
                 wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric("final/robust_acc"))])])
    table = render_markdown(sweep).split("## Figures")[0].split("## How to read this")[0]
    return wr.Report(project=project, entity=entity, title=f"advft sweep {sweep.name}",
                     description="loss x alpha x lr sweep of adversarial fine-tuning (written by launch/report.py)",
                     blocks=[wr.H1("Accuracy and loss by alpha"), grids[0], wr.H1("The same by lr"), grids[1],
                             wr.H1("The same by loss"), grids[2], wr.H1("Final accuracy"), final,
                             wr.MarkdownBlock(text=table)])


def publish_wandb(sweep: Sweep) -> str:
    """Save the wandb report online; returns its URL. Call only when :func:`wandb_unavailable` is None."""
    entity = os.environ.get("WANDB_ENTITY")
    if not entity:  # the login's default entity; the run sets must name it (an empty one selects no runs)
        import wandb

        entity = wandb.Api().default_entity
    # the project and entity the runs were logged to (advft.engine.record.start_wandb uses the same variables)
    report = wandb_report(sweep, project=os.environ.get("WANDB_PROJECT", "advft"), entity=entity)
    report.save()
    return str(report.url)
