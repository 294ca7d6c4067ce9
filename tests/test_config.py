"""Config: TOML + --set overrides, aliases, types, validation errors, round trip."""
from __future__ import annotations

from pathlib import Path

import pytest

from advft import config as C
from conftest import TINY_JOB

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_match_the_report_recipe():
    cfg = C.Config()
    assert cfg.attack.eps == 8 and cfg.attack.steps == 10 and cfg.attack.name == "apgd"
    assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.weight_decay == 1e-4
    assert cfg.optim.warmup_steps == 1400 and cfg.optim.steps == 20000
    assert cfg.data.batch_size == 256 and cfg.optim.lr == 1e-4
    assert cfg.attack.eps_pixels == pytest.approx(8 / 255)


def test_aliases_and_overrides_are_typed():
    cfg = C.load(None, ["alpha=0.5", "lr=3e-4", "optim.betas=0.8,0.9", "run.compile=true", "optim.steps=1e3"])
    assert cfg.loss.alpha == 0.5 and cfg.optim.lr == 3e-4
    assert cfg.optim.betas == (0.8, 0.9) and cfg.run.compile is True and cfg.optim.steps == 1000
    assert isinstance(cfg.optim.steps, int)


def test_toml_round_trip(tmp_path):
    cfg = C.load(TINY_JOB, ["alpha=1"])
    (tmp_path / "config.toml").write_text(C.to_toml(cfg))
    again = C.load(tmp_path / "config.toml")
    assert again == cfg and again.hash() == cfg.hash()


def test_hash_ignores_run_name_but_not_hyperparameters():
    a = C.load(None, ["run.name=a"])
    assert a.hash() == C.load(None, ["run.name=b"]).hash()
    assert a.hash() != C.load(None, ["alpha=1"]).hash()


def test_unknown_section_and_bad_toml(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[optimm]\nlr = 1\n")
    with pytest.raises(C.ConfigError, match="unknown config section 'optimm'; did you mean"):
        C.load(bad)
    bad.write_text("[optim\nlr = 1\n")
    with pytest.raises(C.ConfigError, match="not valid TOML"):
        C.load(bad)
    with pytest.raises(C.ConfigError, match="job file not found"):
        C.load(tmp_path / "missing.toml")


def _valid(tmp_path, *sets, world=1):
    ck = tmp_path / "enc.pt"
    ck.write_bytes(b"x")
    cfg = C.load(None, [f"model.checkpoint={ck}", "data.batch_size=8", "data.synthetic_size=64", *sets])
    return C.validate(cfg, world_size=world)


def test_valid_config_passes(tmp_path):
    _valid(tmp_path)


def _pretraining(tmp_path, *sets):
    from advft import simclr

    return simclr.validate(simclr.load_config(None, list(sets)))


# One table of bad values for both configs: (which config, --set items, what the one-line error must say).
# "load" errors come from reading (keys, types), "finetune" / "pretrain" ones from validation.
CONFIG_ERRORS = [
    ("load", ["optim.lrr=1"], "did you mean 'optim.lr'"),
    ("load", ["alpah=1"], "did you mean 'alpha'"),
    ("load", ["nosection=1"], "unknown config key"),
    ("load", ["lr"], "KEY=VALUE"),
    ("load", ["optim.steps=ten"], "optim.steps: expected an integer"),
    ("load", ["optim.steps=1.5"], "optim.steps: expected an integer"),
    ("load", ["loss.alpha=abc"], "loss.alpha: expected a number"),
    ("load", ["run.compile=maybe"], "run.compile: expected true or false"),
    ("load", ["optim.betas=0.9"], "optim.betas: expected 2 numbers"),
    ("finetune", ["alpha=-0.1"], "loss.alpha = -0.1 must be >= 0"),
    ("finetune", ["attack.eps=0"], "attack.eps = 0.0 must be in (0, 255]"),
    ("finetune", ["attack.eps=300"], "attack.eps = 300.0 must be in (0, 255]"),
    ("finetune", ["optim.warmup_steps=30", "optim.steps=20"],
     "optim.warmup_steps = 30 must be between 0 and optim.steps = 20"),
    ("finetune", ["model.arch=vit"], "model.arch = 'vit' is not valid; choose one of"),
    ("finetune", ["data.format=hdf5"], "data.format = 'hdf5' is not valid"),
    ("finetune", ["lr=0"], "optim.lr = 0.0 must be > 0"),
    ("finetune", ["run.name=../escape"], "run.name = '../escape' is not a valid name"),
    ("finetune", ["run.name=a/b"], "is not a valid name"),
    ("finetune", ["attack.objective=ce_head"], "needs model.head"),
    ("finetune", ["data.format=folder", "data.path=/nonexistent/imagenet"],
     "data.path: /nonexistent/imagenet does not exist"),
    ("finetune", ["data.format=cifar10"], "data.path is empty"),
    ("finetune", ["model.checkpoint=/nonexistent/enc.pt"], "model.checkpoint: /nonexistent/enc.pt does not exist"),
    ("pretrain", ["simclr.temprature=0.5"], "did you mean 'simclr.temperature'"),
    ("pretrain", ["loss.alpha=1"], "unknown config key 'loss.alpha'"),
    ("pretrain", ["simclr.temperature=0"], "simclr.temperature = 0.0 must be in [0.01, 10]"),
    ("pretrain", ["simclr.temperature=abc"], "simclr.temperature: expected a number"),
    ("pretrain", ["simclr.grayscale_p=1.5"], "simclr.grayscale_p = 1.5 must be a probability in [0, 1]"),
    ("pretrain", ["optim.optimizer=lars"], "optim.optimizer = 'lars' is not valid"),
    ("pretrain", ["data.batch_size=1"], "data.batch_size = 1 must be >= 2"),
    ("pretrain", ["data.train_transform=rrc_flip"], "cropped twice"),
    ("pretrain", ["optim.warmup_steps=20000"], "optim.warmup_steps = 20000 must be between 0 and optim.steps"),
]


@pytest.mark.parametrize("kind, sets, needle", CONFIG_ERRORS, ids=[" ".join(c[1]) for c in CONFIG_ERRORS])
def test_config_errors_are_one_line_naming_the_key(tmp_path, kind, sets, needle):
    check = {"load": lambda t, *s: C.load(None, list(s)), "finetune": _valid, "pretrain": _pretraining}[kind]
    with pytest.raises(C.ConfigError) as e:
        check(tmp_path, *sets)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_batch_must_divide_world_size(tmp_path):
    with pytest.raises(C.ConfigError, match="data.batch_size = 8 is not divisible by the world size 3"):
        _valid(tmp_path, world=3)
    _valid(tmp_path, world=2)


def test_missing_checkpoint_key(tmp_path):
    cfg = C.load(None, ["data.batch_size=8", "data.synthetic_size=64"])
    with pytest.raises(C.ConfigError, match="model.checkpoint is empty"):
        C.validate(cfg)


def test_every_job_file_parses():
    jobs = sorted((ROOT / "jobs").glob("*.toml"))
    assert jobs
    for job in jobs:
        if "pretrain" in job.name:
            continue  # pretraining jobs have their own config (advft.simclr)
        cfg = C.load(job)
        try:
            C.validate(cfg, check_paths=False)
        except C.ConfigError as e:  # ffcv/dali jobs on a machine without them: the error names the fix
            assert cfg.data.format in ("ffcv", "dali") and "scripts/install_extras.sh" in str(e), (job, e)


def test_a_run_folder_written_before_fail_at_step_was_removed_still_loads_with_its_hash(tmp_path, caplog):
    # run folders are named by the hash: an old config.toml (with run.fail_at_step) must give the same one
    cfg = C.load(TINY_JOB, ["alpha=1"])
    old = C.to_toml(cfg).replace("[run]\n", "[run]\nfail_at_step = -1\n")
    (tmp_path / "config.toml").write_text(old)
    again = C.load(tmp_path / "config.toml")
    assert again == cfg and again.hash() == cfg.hash()
    assert "fail_at_step" in caplog.text
    # the hash of every field's default is the one of earlier releases (the demo's run folder names)
    assert C.Config().hash() == "5549623d"
    with pytest.raises(C.ConfigError, match="unknown config key 'run.fail_at_step'"):
        C.load(None, ["run.fail_at_step=3"])  # faults are injected by the tests, not by the config


def test_choices_and_ranges_sit_on_the_fields_and_are_checked_in_one_place():
    import typing

    assert typing.get_args(typing.get_type_hints(C.ModelConfig)["arch"]) == ("resnet50", "resnet18", "tiny")
    with pytest.raises(C.ConfigError, match=r"^eval.final_targets = 100 must be in \[0, 99\]$"):
        C.load(None, ["eval.final_targets=100"]).check_fields()
    with pytest.raises(C.ConfigError, match=r"^optim.betas = \(0.9, 1.0\) must lie in \[0, 1\)$"):
        C.load(None, ["optim.betas=0.9,1"]).check_fields()
