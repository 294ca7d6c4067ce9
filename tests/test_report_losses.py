"""Reports of a sweep over losses: a loss without alpha (trades) is reported in its own setting with alpha '-',
beside FARE runs written before loss.name existed."""
from __future__ import annotations

from pathlib import Path

from advft import report as R
from test_report import make_run


def _sweep(tmp_path: Path) -> Path:
    d = tmp_path / "runs" / "losses"
    make_run(d, "alpha=0.1-aaaa0000", 0.1, 1e-4, 0, "finished", 80.0, 15.0)  # config.toml without loss.name
    trades = make_run(d, "loss=trades-bbbb0000", 0.1, 1e-4, 0, "finished", 70.0, 33.0)
    cfg = trades / "config.toml"
    cfg.write_text(cfg.read_text().replace("[loss]\nalpha = 0.1\n", '[loss]\nname = "trades"\nbeta = 1.0\n'))
    res = trades / "results.json"
    res.write_text(res.read_text().replace('"alpha": 0.1', '"loss": "trades", "alpha": null, "beta": 1.0'))
    return d


def test_a_loss_without_alpha_is_its_own_setting_not_left_out(tmp_path: Path) -> None:
    points = R.aggregate(R.load_sweep(_sweep(tmp_path)).runs)
    assert [(p.setting, p.alpha, len(p.runs)) for p in points] == [("loss.name=fare", 0.1, 1),
                                                                    ("loss.name=trades", None, 1)]


def test_report_shows_each_loss_with_its_final_accuracy(tmp_path: Path) -> None:
    md = R.write_report(_sweep(tmp_path)).read_text()
    trades = md.split("### Setting `loss.name=trades`")[1].split("###")[0]
    assert "| - |" in trades and "33" in trades and "70" in trades
    assert "### Setting `loss.name=fare`" in md
