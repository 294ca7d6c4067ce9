"""Reports of a sweep over losses: the loss is an axis of its own (a loss x weight x lr table, the trade-off
coloured by loss, accuracy curves per (loss, weight), per-loss sections and figures); a loss without alpha
(trades) is reported with alpha '-' beside FARE runs written before loss.name existed.

The fake sweep at lr 1e-4, n = 200 test images per run (Wilson intervals about ±6 points):
fare alpha 0 (70 / 40) and alpha 1 (80 / 30), cosine alpha 0.1 (75 / 35), trades beta 1 (50 / 10), deacl
beta 2 (72 / 38): trades is below every other point on both accuracies with intervals apart; the others
overlap pairwise on at least one accuracy.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from advft import report as R
from test_report import make_run

LOSSES = {  # name -> (loss, alpha, beta, final clean, final robust)
    "alpha=0-aaaa0000": ("fare", 0.0, None, 70.0, 40.0),  # config.toml without loss.name: a FARE run
    "loss=fare,alpha=1-aaaa0001": ("fare", 1.0, None, 80.0, 30.0),
    "loss=cosine,alpha=0.1-cccc0000": ("cosine", 0.1, None, 75.0, 35.0),
    "loss=trades-bbbb0000": ("trades", None, 1.0, 50.0, 10.0),
    "loss=deacl-dddd0000": ("deacl", None, 2.0, 72.0, 38.0),  # its own default beta: no setting of its own
}


def _sweep(tmp_path: Path) -> Path:
    d = tmp_path / "runs" / "losses"
    for name, (loss, alpha, beta, clean, robust) in LOSSES.items():
        run = make_run(d, name, 0.1 if alpha is None else alpha, 1e-4, 0, "finished", clean, robust)
        cfg, res = run / "config.toml", run / "results.json"
        if name.startswith("loss="):
            weights = f"alpha = {alpha!r}\n" if alpha is not None else f"beta = {beta!r}\n"
            cfg.write_text(cfg.read_text().replace("[loss]\nalpha = 0.1\n", f'[loss]\nname = "{loss}"\n{weights}')
                           .replace(f"[loss]\nalpha = {alpha!r}\n", f'[loss]\nname = "{loss}"\n{weights}'))
        if alpha is None:
            res.write_text(res.read_text().replace('"alpha": 0.1', f'"loss": "{loss}", "alpha": null, "beta": {beta}'))
    return d


def test_points_are_keyed_by_loss_and_weight(tmp_path: Path) -> None:
    points = R.aggregate(R.load_sweep(_sweep(tmp_path)).runs)
    assert [(p.setting, p.loss, p.alpha, p.beta, p.name()) for p in points] == [
        ("", "cosine", 0.1, None, "cosine α=0.1"), ("", "deacl", None, 2.0, "deacl β=2"),
        ("", "fare", 0.0, None, "fare α=0"),
        ("", "fare", 1.0, None, "fare α=1"), ("", "trades", None, 1.0, "trades β=1")]


def test_report_compares_losses_in_one_table_and_claims_only_what_intervals_support(tmp_path: Path) -> None:
    md = R.write_report(_sweep(tmp_path)).read_text()
    table = md.split("## Losses compared")[1].split("## Results")[0]
    rows = [ln for ln in table.splitlines() if ln.startswith("| ") and not ln.startswith("| loss")]
    assert "### Setting" not in md  # the losses' weights are the table's columns, not settings
    assert [ln.split(" | ")[:4] for ln in rows] == [
        ["| cosine", "0.1", "-", "0.0001"], ["| deacl", "-", "2", "0.0001"], ["| fare", "0", "-", "0.0001"],
        ["| fare", "1", "-", "0.0001"], ["| trades", "-", "1", "0.0001"]]
    trades = next(ln for ln in rows if ln.startswith("| trades"))
    assert "-> 50.0 [43.1, 56.9] (n=200)" in trades and "-> 10.0 [6.6, 14.9] (n=200)" in trades
    found = table.split("**What the numbers support**")[1]
    # trades is below fare alpha 0 (and the others) on both accuracies with intervals apart on both ...
    assert "`trades β=1` (50.0 % [43.1, 56.9] clean, 10.0 % [6.6, 14.9] robust) is below `cosine α=0.1`" in found
    assert "`deacl β=2` (72.0 % [65.4, 77.8], 38.0 % [31.6, 44.9])" in found
    assert "`fare α=0` (70.0 % [63.3, 75.9], 40.0 % [33.5, 46.9])" in found
    # ... while cosine and fare alpha 0 overlap: neither is said to be below the other
    assert "`cosine α=0.1` (" not in found.split("is below")[0] and found.count("is below") == 1
    assert ("Final robust accuracy, lr = 0.0001, over 5 (loss, weight) points: from 10.0 % (`trades β=1`) to 40.0 % "
            "(`fare α=0`), a spread of 30.0 points. Lowest against highest: higher at `fare α=0`") in found


def test_each_loss_gets_its_own_alpha_x_lr_section(tmp_path: Path) -> None:
    md = R.write_report(_sweep(tmp_path)).read_text()
    for loss in ("cosine", "deacl", "fare", "trades"):
        assert f"### Loss `{loss}`" in md
    trades = md.split("### Loss `trades`")[1].split("###")[0]
    assert "| beta \\ lr | 0.0001 |\n|---|---|\n| 1 | 85.0" in trades and "-> 10.0 [6.6, 14.9]" in trades
    assert "Robust accuracy, beta = 1, lr = 0.0001: higher at the end" in trades
    runs = md.split("## Runs")[1]
    assert "| `loss=trades-bbbb0000` | trades | - |" in runs and "| `alpha=0-aaaa0000` | fare | 0 |" in runs


def test_a_one_loss_sweep_keeps_the_alpha_x_lr_layout(tmp_path: Path) -> None:
    d = tmp_path / "runs" / "one"
    make_run(d, "alpha=0-aaaa0000", 0.0, 1e-4, 0, "finished", 70.0, 40.0)
    make_run(d, "alpha=1-aaaa0001", 1.0, 1e-4, 0, "finished", 80.0, 30.0)
    md = R.write_report(d).read_text()
    assert "## Losses compared" not in md and "### Loss" not in md and "## Results: alpha x lr\n" in md
    assert [label for label, *_ in R.tradeoff_series(R.aggregate(R.load_sweep(d).runs))] == ["lr=0.0001"]
    assert sorted(p.name for p in (d / "figures").iterdir()) == [
        "accuracy_by_alpha.png", "final_heatmaps.png", "loss_by_alpha.png", "tradeoff.png"]


def test_figures_colour_the_tradeoff_by_loss_and_draw_curves_per_loss(tmp_path: Path) -> None:
    d = _sweep(tmp_path)
    series = R.tradeoff_series(R.aggregate(R.load_sweep(d).runs))
    assert [(label, key, [p.name() for p in pts]) for label, key, _, pts in series] == [
        ("cosine", "cosine", ["cosine α=0.1"]), ("deacl", "deacl", ["deacl β=2"]),
        ("fare", "fare", ["fare α=0", "fare α=1"]),
        ("trades", "trades", ["trades β=1"])]
    R.write_report(d)
    names = sorted(p.name for p in (d / "figures").iterdir())
    assert "tradeoff.png" in names and "accuracy_by_loss.png" in names
    for loss in ("cosine", "deacl", "fare", "trades"):
        assert {f"{loss}_{what}.png" for what in ("accuracy_by_alpha", "loss_by_alpha", "final_heatmaps")} <= set(names)
    assert all((d / "figures" / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names)


def test_curves_by_loss_have_one_line_per_loss_and_weight(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    points = R.aggregate(R.load_sweep(_sweep(tmp_path)).runs)
    drawn: list[list[str]] = []
    orig = plt.Figure.savefig

    def spy(fig, *a, **k):  # the legend labels of the first panel, read where the figure is saved
        drawn.append([t.get_text() for t in fig.axes[0].get_legend().get_texts()])
        return orig(fig, *a, **k)

    plt.Figure.savefig = spy
    try:
        R.plot_curves(points, tmp_path / "by_loss.png", by="loss", kind="eval", keys=(("clean_acc", "clean"),))
    finally:
        plt.Figure.savefig = orig
    assert drawn == [["cosine α=0.1", "deacl β=2", "fare α=0", "fare α=1", "trades β=1"]]


def test_the_second_radius_of_the_final_evaluation_is_a_column_of_the_loss_table(tmp_path: Path) -> None:
    import json

    d = _sweep(tmp_path)
    extra = {"alpha=0-aaaa0000": 60.0, "loss=deacl-dddd0000": 20.0}  # the others' results.json lack it
    for name, acc in extra.items():
        res = d / name / "results.json"
        rec = json.loads(res.read_text())
        rec["final"].update({"eps_extra": 16.0, "robust_acc_eps_extra": acc})
        res.write_text(json.dumps(rec))
    table = R.write_report(d).read_text().split("## Losses compared")[1].split("## Results")[0]
    assert "| robust % at 16/255, initial -> final | status |" in table
    fare0 = next(ln for ln in table.splitlines() if ln.startswith("| fare | 0 |"))
    assert fare0.endswith("-> 60.0 [53.1, 66.5] (n=200) | finished |")
    assert ("Final robust accuracy at 16/255, lr = 0.0001, over 2 (loss, weight) points: from 20.0 % (`deacl β=2`) "
            "to 60.0 % (`fare α=0`)") in table


def test_figures_of_an_earlier_layout_do_not_outlive_it(tmp_path: Path) -> None:
    """A one-loss sweep that gains a second loss: its old un-prefixed per-alpha figures go, REPORT.md's stay."""
    d = tmp_path / "runs" / "grows"
    make_run(d, "alpha=0-aaaa0000", 0.0, 1e-4, 0, "finished", 70.0, 40.0)
    R.write_report(d)
    assert (d / "figures" / "accuracy_by_alpha.png").is_file()
    make_run(d, "loss=trades-bbbb0000", 0.1, 1e-4, 0, "finished", 50.0, 10.0)
    cfg = d / "loss=trades-bbbb0000" / "config.toml"
    cfg.write_text(cfg.read_text().replace("[loss]\nalpha = 0.1\n", '[loss]\nname = "trades"\nbeta = 1.0\n'))
    md = R.write_report(d).read_text()
    names = {p.name for p in (d / "figures").iterdir()}
    assert "accuracy_by_alpha.png" not in names and "fare_accuracy_by_alpha.png" in names
    assert all(f"figures/{n}" in md for n in names)
