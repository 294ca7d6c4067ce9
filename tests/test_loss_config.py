"""loss.name and the loss weights in the run config: defaults per loss, refusals, round trip, run hashes."""
from __future__ import annotations

import pytest

from advft import config as C


def test_each_loss_gets_its_own_default_weights_and_only_those():
    assert (C.load(None).loss.alpha, C.load(None).loss.beta) == (0.1, None)
    trades = C.load(None, ["loss.name=trades"]).loss
    assert (trades.alpha, trades.beta) == (None, 1.0)
    assert C.load(None, ["loss.name=deacl", "beta=0.5"]).loss.beta == 0.5


@pytest.mark.parametrize("sets,message", [
    (["loss.name=trades", "alpha=0.1"], "loss.alpha = 0.1 is not read by loss.name = 'trades' (it reads loss.beta); "
                                         "remove loss.alpha"),
    (["beta=1"], "loss.beta = 1.0 is not read by loss.name = 'fare' (it reads loss.alpha); remove loss.beta"),
    (["loss.name=cosine", "loss.reduction=mean"], "loss.reduction = 'mean' is not read by loss.name = 'cosine'"),
    (["loss.name=l2"], "loss.name = 'l2' is not valid; choose one of: fare, cosine, trades, deacl"),
    (["loss.name=trades", "beta=-1"], "loss.beta = -1.0 must be >= 0"),
])
def test_validate_refuses_what_the_loss_does_not_read_in_one_line(sets, message):
    with pytest.raises(C.ConfigError) as e:
        C.validate(C.load(None, sets), check_paths=False)
    assert str(e.value) == message or str(e.value).startswith(message)


@pytest.mark.parametrize("name", ["fare", "cosine", "trades", "deacl"])
def test_round_trip_keeps_the_loss_and_leaves_unread_weights_out(tmp_path, name):
    cfg = C.load(None, [f"loss.name={name}"])
    (tmp_path / "config.toml").write_text(C.to_toml(cfg))
    text = (tmp_path / "config.toml").read_text()
    assert ("\nalpha =" in text) == (name in ("fare", "cosine"))
    assert ("\nbeta =" in text) == (name in ("trades", "deacl"))
    again = C.load(tmp_path / "config.toml")
    assert again == cfg and again.hash() == cfg.hash()


def test_fare_runs_keep_their_hash_and_other_losses_get_their_own():
    fare = C.load(None)
    # the hash of the default config from before loss.name existed: finished runs are found again by name
    assert fare.hash() == C.load(None, ["loss.name=fare", "alpha=0.1"]).hash() == "5549623d"
    hashes = {C.load(None, [f"loss.name={n}"]).hash() for n in ("fare", "cosine", "trades", "deacl")}
    assert len(hashes) == 4
