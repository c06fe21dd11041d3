"""model.fp8 / fp8_recipe / fp8_params -> TransformerConfig fields, and the errors without a GPU or TE."""

import dataclasses

import pytest
import torch

from megatron_mgrpo.config import load_config
from megatron_mgrpo.models import hf_config
from megatron_mgrpo.models.hf_config import fp8_settings


def test_fp8_is_off_by_default():
    model = load_config(None, []).model
    assert (model.fp8, model.fp8_recipe, model.fp8_params) == ("off", "delayed", False)
    assert fp8_settings(model.fp8, model.fp8_recipe, model.fp8_params) == {}


def test_fp8_without_a_gpu_names_the_setting_and_the_fix():
    assert not torch.cuda.is_available()  # the CPU test machine
    with pytest.raises(ValueError, match=r"model.fp8=e4m3 needs a CUDA GPU.*`gpu` extra.*model.fp8=off"):
        fp8_settings("e4m3")


def test_fp8_without_transformer_engine_says_to_install_the_gpu_extra(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(hf_config.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"model.fp8=hybrid needs Transformer Engine.*install the `gpu` extra"):
        fp8_settings("hybrid", "tensorwise")


@pytest.mark.parametrize("args, message", [
    (("off", "delayed", True), "model.fp8_params=true needs FP8 compute"),
    (("e5m2",), "model.fp8='e5m2' is not supported"),
    (("e4m3", "mxfp8"), "model.fp8_recipe='mxfp8' is not supported"),
])
def test_inconsistent_fp8_settings_fail(args, message):
    with pytest.raises(ValueError, match=message):
        fp8_settings(*args)


@pytest.mark.slow  # imports megatron-core
def test_fp8_settings_are_transformer_config_fields(monkeypatch):
    from megatron.core.transformer import TransformerConfig

    monkeypatch.setattr(hf_config, "transformer_engine_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    settings = fp8_settings("hybrid", "blockwise", True)
    assert settings == {"fp8": "hybrid", "fp8_recipe": "blockwise", "fp8_param": True}
    assert set(settings) <= {f.name for f in dataclasses.fields(TransformerConfig)}
