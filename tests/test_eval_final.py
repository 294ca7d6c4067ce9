"""An evaluation that can resolve alpha: the strong evaluations (step 0, end) on their own, larger sets, every
accuracy with its 95 % interval and n, the recipes' sizes, and a seed axis that the report aggregates."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from advft import config as C
from advft.data import eval_data
from advft.evaluate import evaluate
from advft.models import load_encoder
from advft.report import stats as S

ROOT = Path(__file__).resolve().parent.parent


def _count(batches) -> int:
    return sum(int(y.numel()) for _, y in batches)


def test_final_sets_are_their_own_size_and_hold_the_routine_ones(tiny_cfg) -> None:
    cfg = tiny_cfg("eval.final_test_size=96", "eval.final_probe_train_size=160")
    probe, test = eval_data(cfg, torch.device("cpu"))
    assert (_count(probe()), _count(test())) == (cfg.eval.probe_train_size, cfg.eval.test_size)
    assert (_count(probe(final=True)), _count(test(final=True))) == (160, 96)
    # 0 = the routine sizes
    probe0, test0 = eval_data(tiny_cfg(), torch.device("cpu"))
    assert (_count(probe0(final=True)), _count(test0(final=True))) == (128, 64)


def test_every_accuracy_carries_its_wilson_interval_and_n(tiny_cfg) -> None:
    cfg = tiny_cfg("eval.final_test_size=96")
    enc = load_encoder(cfg.model.checkpoint, arch=cfg.model.arch, stem=cfg.model.stem, normalize=cfg.model.normalize)
    probe, test = eval_data(cfg, torch.device("cpu"))
    res = evaluate(enc, probe, test, cfg=cfg, device=torch.device("cpu"), n_iter=2, n_targets=1, final=True,
                   precision="fp32")
    assert res["n_test"] == 96 and res["ci"] == "wilson" and res["probe_n"] == 128
    for key, n in (("clean_acc", 96), ("robust_acc", 96), ("probe_train_acc", 128)):
        assert res[f"{key}_ci95"] == pytest.approx(list(S.wilson(res[key], n)))
        lo, hi = res[f"{key}_ci95"]
        assert lo <= res[key] <= hi
    routine = evaluate(enc, probe, test, cfg=cfg, device=torch.device("cpu"), n_iter=2, precision="fp32")
    assert routine["n_test"] == cfg.eval.test_size


def test_wilson_and_t_quantiles() -> None:
    assert S.wilson(50.0, 100) == pytest.approx((40.383, 59.617), abs=1e-3)
    assert S.wilson(0.0, 10) == pytest.approx((0.0, 27.753), abs=1e-3)  # never below 0, unlike p ± z·se
    assert S.wilson(100.0, 10)[1] == pytest.approx(100.0)

    def t_cdf(t: float, df: int) -> float:  # Simpson's rule on Student's t density, from 0 to t
        c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
        n, h = 4000, t / 4000
        f = [c * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(n + 1)]
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))

    for df in (1, 2, 4, 9, 29, 30, 31, 60, 200):
        assert t_cdf(S.t975(df), df) == pytest.approx(0.975, abs=2e-4), df


def test_recipes_evaluate_on_enough_images_at_the_end() -> None:
    cifar = C.load(ROOT / "jobs" / "cifar10.toml")
    assert cifar.eval.final_test_size == 10000  # the whole CIFAR-10 test split
    assert cifar.eval.final_probe_train_size == 50000
    imagenet = C.load(ROOT / "jobs" / "imagenet.toml")
    assert imagenet.eval.final_test_size >= 10000
    assert imagenet.eval.final_probe_train_size / 1000 >= 100  # a real linear probe: ~100+ images per class
    for cfg in (cifar, imagenet):
        # a half-width of at most 1 point at 50 % (the widest), where 1000 images gave ~3
        lo, hi = S.wilson(50.0, cfg.eval.final_test_size)
        assert (hi - lo) / 2 <= 1.0


def test_seed_axis_names_runs_and_aggregates_into_mean_and_interval(tmp_path: Path) -> None:
    from launch.sweeper.grid import expand, parse_grid, run_name

    axes = parse_grid(["alpha=0,1", "seed=0,1,2"])
    assert [a.key for a in axes] == ["loss.alpha", "run.seed"]
    names = {run_name(C.load(None, point), axes) for point in expand(axes)}
    assert len(names) == 6 and any(n.startswith("alpha=0,seed=2-") for n in names)

    from test_report import make_run

    from advft import report as R

    d = tmp_path / "sw"
    for seed, (clean, robust) in enumerate([(70.0, 20.0), (72.0, 26.0), (77.0, 29.0)]):
        make_run(d, f"alpha=0,seed={seed}", 0.0, 1e-4, seed, "finished", clean, robust)
    (point,) = R.aggregate(R.load_sweep(d).runs)
    st = point.final("robust_acc")
    sd = math.sqrt(((20 - 25) ** 2 + (26 - 25) ** 2 + (29 - 25) ** 2) / 2)
    assert (st.n, st.mean, st.method) == (3, 25.0, "t")
    assert (st.lo, st.hi) == pytest.approx((25.0 - S.t975(2) * sd / math.sqrt(3), 25.0 + S.t975(2) * sd / math.sqrt(3)))
    assert "25.0 [" in R.render_markdown(R.load_sweep(d)) and "(3 seeds)" in R.render_markdown(R.load_sweep(d))


def test_sweep_table_shows_intervals_and_n(tmp_path: Path) -> None:
    import json

    from launch.sweeper.record import results_table

    run = tmp_path / "r"
    run.mkdir()
    ev = {"clean_acc": 72.0, "clean_acc_ci95": list(S.wilson(72.0, 1000)), "robust_acc": 30.0,
          "robust_acc_ci95": list(S.wilson(30.0, 1000)), "n_test": 1000}
    (run / "results.json").write_text(json.dumps({"status": "finished", "initial": ev, "final": ev}))
    text = results_table([("r", run, {"loss": {"alpha": 0.1}, "optim": {"lr": 1e-4}})])
    assert "72.0 [69.1, 74.7] (n=1000) -> 72.0 [69.1, 74.7] (n=1000)" in text
    assert "30.0 [27.2, 32.9] (n=1000)" in text


def test_sweep_table_names_the_loss_and_shows_unread_weights_as_dashes(tmp_path: Path) -> None:
    """A loss without alpha (trades) gets its row: the table crashed on cfg['loss']['alpha'] before."""
    from advft import config as C
    from launch.sweeper.record import results_table

    runs = []
    for name in ("fare", "trades"):
        cfg = C.load(None, [f"loss.name={name}"]).to_dict()
        runs.append((name, tmp_path / name, cfg))  # no folder: not started
    rows = {line.split()[0]: line.split() for line in results_table(runs).splitlines()[1:]}
    assert rows["fare"][1] == "fare" and rows["fare"][2] != "-" and rows["fare"][3] == "-"
    assert rows["trades"][1:4] == ["trades", "-", "1"]


def test_new_eval_keys_at_their_defaults_keep_the_hash_and_change_it_otherwise() -> None:
    """Run folders are named by the config hash: the keys added here must not rename existing runs."""
    base = C.Config()
    assert base.hash() == "5549623d"  # the hash of every default before these keys existed
    for item in ("eval.final_test_size=10000", "eval.final_probe_train_size=50000",
                 "eval.final_attack=autoattack"):
        assert C.load(None, [item]).hash() != base.hash(), item
