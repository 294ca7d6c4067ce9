"""The fine-tuning loop end to end on the tiny job: results, exact resume, frozen reference, non-finite stop."""
from __future__ import annotations

import json

import pytest
import torch

from advft import checkpoint as ckpt
from advft.engine import Interrupted, NonFiniteLossError
from advft.fare import FareTask, finetune
from advft.models import load_encoder


def final_weights(cfg) -> dict[str, torch.Tensor]:
    step, state = ckpt.load_latest(cfg.run.dir)
    assert step == cfg.optim.steps
    return state["model"]


def test_run_end_to_end_writes_its_record(tiny_cfg):
    cfg = tiny_cfg()
    res = finetune(cfg)
    d = cfg.run.dir
    assert res["status"] == "finished" and {"initial", "final"} <= set(res)
    for k in ("clean_acc", "robust_acc", "n_test", "attack"):
        assert k in res["initial"] and k in res["final"]
    assert res["final"]["attack"] == "apgd-ce5+apgd-t5x2"
    recs = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    evals = [r for r in recs if r["kind"] == "eval"]
    assert [r["step"] for r in train] == [2, 4, 6, 8]
    assert [r["step"] for r in evals] == [0, 4, 8]
    assert all(k in train[0] for k in ("loss", "adv_loss", "clean_loss", "adv_cos", "clean_cos", "lr", "img_per_s"))
    assert (d / "config.toml").is_file() and (d / "manifest.json").is_file()
    # training moved the encoder away from the base (the attack found a non-zero loss from phi == phi_org)
    assert train[0]["adv_loss"] > 0
    # a finished run is not run again
    mtime = (d / "results.json").stat().st_mtime_ns
    assert finetune(cfg)["status"] == "finished" and (d / "results.json").stat().st_mtime_ns == mtime


def test_resume_is_bit_identical_to_an_uninterrupted_run(tiny_cfg):
    ref = tiny_cfg(name="ref")
    finetune(ref)
    cut = tiny_cfg(name="cut")
    calls = {"n": 0}

    def stop_once():  # polled at log steps (2, 4, 6): ask to stop at step 6, a non-checkpoint step
        calls["n"] += 1
        return calls["n"] == 3

    with pytest.raises(Interrupted) as e:
        finetune(cut, should_stop=stop_once)
    assert e.value.step == 6 and ckpt.load_latest(cut.run.dir)[0] == 6
    finetune(cut)
    a, b = final_weights(ref), final_weights(cut)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(x)["step"] for x in (cut.run.dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["kind"] == "train"]
    assert steps == [2, 4, 6, 8]  # no step logged twice or lost


def test_frozen_reference_unchanged_and_attack_leaves_no_grads(tiny_cfg, base_encoder, monkeypatch):
    seen = {}
    import advft.fare.step as S

    orig = S.training_loss

    def spy(name, encoder, z, x, target, weights, joint=False):
        # the attack ran before this: no parameter may hold a gradient yet in this step
        mod = encoder.module if hasattr(encoder, "module") else encoder
        seen.setdefault("grads_before", []).append(all(p.grad is None for p in mod.parameters()))
        return orig(name, encoder, z, x, target, weights, joint)

    monkeypatch.setattr(S, "training_loss", spy)
    cfg = tiny_cfg()
    before = load_encoder(base_encoder, "tiny", "cifar").state_dict()
    finetune(cfg)
    assert all(seen["grads_before"])
    after = load_encoder(base_encoder, "tiny", "cifar").state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    trained = final_weights(cfg)
    assert any(not torch.equal(before["net." + k], v) for k, v in trained.items() if "net." + k in before)


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tiny_cfg, nan_at):
    nan_at(FareTask, 5)
    cfg = tiny_cfg()
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 5"):
        finetune(cfg)
    assert [s for s, _ in ckpt.list_checkpoints(cfg.run.dir)] == [4]
    res = json.loads((cfg.run.dir / "results.json").read_text())
    assert res["status"] == "failed" and "step 5" in res["error"]


def test_folder_of_another_config_is_refused(tiny_cfg):
    from advft.config import ConfigError

    finetune(tiny_cfg(name="same"))
    with pytest.raises(ConfigError, match="different config"):
        finetune(tiny_cfg("alpha=1", name="same"))


def test_alpha_zero_and_pgd_and_bn_eval_variants_run(tiny_cfg):
    res = finetune(tiny_cfg("alpha=0", "attack.name=pgd", "model.bn=eval", "optim.steps=4", "eval.every=0"))
    assert res["status"] == "finished"
