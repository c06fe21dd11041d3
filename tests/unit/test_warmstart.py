"""The warm start's cache is keyed on its questions, and it needs the warm-start split."""

from pathlib import Path

import pytest

from megatron_mgrpo.config import ConfigError, load_config
from megatron_mgrpo.data.splits import builtin_split
from megatron_mgrpo.warmstart import cache_key, warm_start


def test_the_cache_key_changes_with_the_questions_and_the_seed():
    cfg, model = load_config(overrides=["warmstart.steps=10"]), Path("tiny-qwen3-abc")
    first, other = builtin_split("small_sums", "warmstart", 20, 0), builtin_split("small_sums", "warmstart", 20, 100)
    assert cache_key(cfg, model, first) == cache_key(cfg, model, list(reversed(first)))  # a set of questions
    assert cache_key(cfg, model, first) != cache_key(cfg, model, other)
    assert cache_key(cfg, model, first) != cache_key(load_config(overrides=["warmstart.steps=10", "train.seed=7"]),
                                                     model, first)


def test_a_warm_start_without_its_split_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="needs the warm-start split's questions"):
        warm_start(load_config(overrides=["warmstart.steps=10"]), tmp_path, tmp_path, [])
