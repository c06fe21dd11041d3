import dataclasses

import pytest
import yaml

from megatron_mgrpo.config import Config, ConfigError, _leaf_paths, load_config, to_yaml


def test_defaults_are_the_paper_recipe():
    cfg = load_config()
    assert cfg.rollout.group_size == 32 and cfg.samples_per_prompt() == (24, 8)
    assert cfg.rollout.temperature == 1.1
    assert (cfg.train.lr, cfg.train.lr_schedule) == (1e-6, "cosine") and cfg.train.lr_warmup_steps > 0
    assert (cfg.algo.kl_coef, cfg.algo.kl_estimator) == (0.005, "k3")
    assert cfg.algo.momentum == 0.99 and cfg.algo.iqr_k == 0.75 and cfg.algo.iqr_filter
    assert cfg.reward.label_source == "mgrpo" and cfg.train.prompts_per_step == 8


@pytest.mark.parametrize("source", ["srt", "ttrl", "gt", "intuitor"])
def test_label_free_baselines_sample_everything_from_the_policy(source):
    cfg = load_config(overrides=[f"reward.label_source={source}"])
    assert cfg.samples_per_prompt() == (32, 0)


def test_file_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("algo:\n  momentum: 0.9\n  iqr_k: 1.5\ntrain:\n  steps: 7\n")
    cfg = load_config(path, ["algo.momentum=0.5", "data.fields.question=problem"])
    assert cfg.algo.momentum == 0.5  # the command line wins over the file
    assert cfg.algo.iqr_k == 1.5 and cfg.train.steps == 7  # the file wins over defaults
    assert cfg.data.fields.question == "problem" and cfg.data.fields.answer == "answer"
    assert cfg.rollout.group_size == 32


def test_yaml_round_trip(tmp_path):
    cfg = load_config(overrides=["reward.label_source=srt", "train.lr=3e-6", "log.wandb=disabled"])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize("override, expected", [
    ("algo.momentom=0.9", "did you mean 'algo.momentum'"),
    ("alg.momentum=0.9", "did you mean 'algo'"),
    ("train.momentum=0.9", "did you mean 'algo.momentum'"),
    ("data.fields.questoin=q", "did you mean 'data.fields.question'"),
    ("algo.zzzz=1", "valid keys here: "),
])
def test_unknown_keys_suggest_the_right_one(override, expected):
    with pytest.raises(ConfigError, match="unknown config key") as err:
        load_config(overrides=[override])
    assert expected in str(err.value)


@pytest.mark.parametrize("override, expected", [
    ("algo.momentum=1.5", "algo.momentum=1.5 is out of range: must be >= 0 and <= 1"),
    ("rollout.temperature=0", "rollout.temperature=0.0 is out of range: must be > 0"),
    ("algo.kl_estimator=k4", "algo.kl_estimator='k4' is not allowed; choose one of: k1, k2, k3"),
    ("reward.label_source=vote", "choose one of: mgrpo, srt, ttrl, gt, intuitor"),
    ("train.steps=ten", "train.steps='ten' has the wrong type: expected int"),
    ("algo.iqr_filter=3", "algo.iqr_filter=3 has the wrong type: expected bool"),
    ("algo=3", "algo must be a mapping"),
    ("reward.vote_pool=policy", "reward.vote_pool='policy' is not allowed; choose one of: pool, momentum"),
    ("algo.momentum_schedule=linear", "algo.momentum_schedule='linear' is not allowed; choose one of: constant, "
                                      "cosine"),
    ("algo.momentum_final=1.01", "algo.momentum_final=1.01 is out of range: must be >= 0 and <= 1"),
    ("eval.holdout_fraction=1", "eval.holdout_fraction=1.0 is out of range: must be > 0 and < 1"),
    ("warmstart.size=0", "warmstart.size=0 is out of range: must be >= 1"),
    ("log.anchor_interval=-1", "log.anchor_interval=-1 is out of range: must be >= 0"),
])
def test_bad_values_name_key_value_and_allowed(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert expected in str(err.value)


@pytest.mark.parametrize("overrides, expected", [
    (["rollout.group_size=8", "rollout.momentum_samples=7"], "lower rollout.momentum_samples"),
    (["reward.label_source=ttrl", "reward.ttrl_train_samples=64"], "set it to at most 32"),
    (["train.min_lr=1e-3"], "train.min_lr=0.001 is above train.lr"),
    (["reward.label_source=srt", "algo.kl_reference=momentum"], "use kl_reference=initial"),
    (["reward.label_source=srt", "reward.vote_pool=momentum"], "only reward.label_source=mgrpo draws .* use "
                                                               "vote_pool=pool"),
])
def test_rules_across_keys(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(overrides=overrides)


def test_every_bound_is_enforced_at_its_edge():
    """A value just past each declared bound is rejected with the key in the message."""
    cfg = Config()
    checked = 0
    for path in _leaf_paths():
        section, _, leaf = path.rpartition(".")
        owner = cfg
        for part in section.split("."):
            owner = getattr(owner, part)
        meta = {f.name: f.metadata for f in dataclasses.fields(owner)}[leaf]
        kind = type(getattr(owner, leaf))
        step = 1 if kind is int else 1e-3
        for key, outside in (("ge", -step), ("gt", 0), ("le", step), ("lt", 0)):
            if meta.get(key) is None:
                continue
            bad = kind(meta[key] + outside)
            with pytest.raises(ConfigError, match=f"{path}="):
                load_config(overrides=[f"{path}={bad}"])
            checked += 1
    assert checked >= 20


def test_every_leaf_is_documented():
    def walk(node):
        for f in dataclasses.fields(node):
            assert f.metadata.get("help"), f"{type(node).__name__}.{f.name} has no help text"
            if dataclasses.is_dataclass(getattr(node, f.name)):
                walk(getattr(node, f.name))
    walk(Config())


def test_bad_files_and_overrides(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listing)
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(overrides=["algo.momentum"])
    assert yaml.safe_load(to_yaml(Config()))["algo"]["momentum"] == 0.99


def test_study_knobs_accept_their_values():
    cfg = load_config(overrides=["algo.momentum=1.0", "reward.vote_pool=momentum", "algo.momentum_schedule=cosine",
                                 "algo.momentum_final=0.9999"])
    assert (cfg.algo.momentum, cfg.reward.vote_pool, cfg.algo.momentum_schedule, cfg.algo.momentum_final) == (
        1.0, "momentum", "cosine", 0.9999)
    defaults = load_config()
    assert (defaults.algo.momentum, defaults.algo.momentum_schedule, defaults.reward.vote_pool) == (
        0.99, "constant", "pool")
