"""Shipped recipes with the model configs of their models."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
RECIPES = {
    "mgrpo_qwen3_4b_math.yaml": "Qwen3-4B-Base.json",
    "mgrpo_qwen3_8b_math.yaml": "Qwen3-8B-Base.json",
    "mgrpo_qwen3_30b_a3b_math.yaml": "Qwen3-30B-A3B-Base.json",
}


def recipe_path(name: str) -> str:
    return str(ROOT / "examples" / "configs" / name)


def model_config_path(recipe: str) -> str:
    return str(ROOT / "examples" / "model_configs" / RECIPES[recipe])


@pytest.fixture
def load_recipe():
    """(config, model shape) of a shipped recipe, with overrides."""
    from megatron_mgrpo.config import load_config
    from megatron_mgrpo.launch.model_shape import load_model_shape

    def load(name: str, *overrides: str):
        cfg = load_config(recipe_path(name), list(overrides))
        shape, _ = load_model_shape(cfg.model.path, model_config_path(name))
        return cfg, shape

    return load
