import re

import pytest
import torch
from transformers import (
    LlamaConfig,
    Qwen2Config,
    Qwen3Config,
)

from megatron_mgrpo.models.hf_config import gpt_model_kwargs, model_spec_from_hf, padded_vocab
from megatron_mgrpo.models.weight_map import hf_to_megatron, megatron_to_hf
from tests.helpers import COMMON, tiny


@pytest.mark.parametrize("kind, tied", [("llama", False), ("qwen2", False), ("qwen3", False), ("qwen3", True)])
@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
@pytest.mark.parametrize("fused_norms", [False, True])
def test_round_trip_is_bit_exact(kind, tied, tp, pp, fused_norms):
    model = tiny(kind, tied=tied)
    hf = model.state_dict()
    spec = model_spec_from_hf(model.config, tp=tp)
    restored = {}
    for pp_rank in range(pp):
        shards = [hf_to_megatron(hf, spec, tp_rank=r, tp_size=tp, pp_rank=pp_rank, pp_size=pp,
                                 fused_norms=fused_norms) for r in range(tp)]
        assert all(shard.keys() == shards[0].keys() for shard in shards)
        restored.update(megatron_to_hf(shards, spec, pp_rank=pp_rank, pp_size=pp))
    if tied:  # HF lists the tied head under both names; export names it once, as the embedding
        hf.pop("lm_head.weight")
    assert restored.keys() == hf.keys()
    for name, tensor in hf.items():
        assert torch.equal(restored[name], tensor), name


def test_stages_split_the_layers_and_the_edges():
    model = tiny("llama")
    spec = model_spec_from_hf(model.config)
    first, last = (hf_to_megatron(model.state_dict(), spec, pp_rank=r, pp_size=2) for r in range(2))
    assert "embedding.word_embeddings.weight" in first and "output_layer.weight" not in first
    assert "output_layer.weight" in last and "embedding.word_embeddings.weight" not in last
    # local layer 0 of the last stage is global layer 2
    assert torch.equal(last["decoder.layers.0.mlp.linear_fc2.weight"],
                       model.state_dict()["model.layers.2.mlp.down_proj.weight"])
    assert not any(name.startswith("decoder.layers.2.") for name in first.keys() | last.keys())


def test_shards_split_groups_and_pad_the_vocabulary():
    model = tiny("qwen3")
    spec = model_spec_from_hf(model.config, tp=2)
    assert spec.padded_vocab_size == padded_vocab(101, 2) == 256
    shard = hf_to_megatron(model.state_dict(), spec, tp_rank=1, tp_size=2)
    # one query group per rank: 2 q heads + 1 k head + 1 v head of 16 channels
    assert shard["decoder.layers.0.self_attention.linear_qkv.weight"].shape == (64, 64)
    assert shard["decoder.layers.0.mlp.linear_fc1.weight"].shape == (96, 64)  # [gate half; up half]
    assert shard["output_layer.weight"].shape == (128, 64) and (shard["output_layer.weight"] == 0).all()
    full = hf_to_megatron(model.state_dict(), spec, tp_rank=0, tp_size=2)
    k_head = model.state_dict()["model.layers.0.self_attn.k_proj.weight"][:16]
    assert torch.equal(full["decoder.layers.0.self_attention.linear_qkv.weight"][32:48], k_head)


def test_tied_embeddings_live_on_the_first_stage_and_are_copied_to_the_last():
    model = tiny("llama", tied=True)
    spec = model_spec_from_hf(model.config)
    assert spec.tied_embeddings and "output_layer.weight" not in hf_to_megatron(model.state_dict(), spec)
    last = hf_to_megatron(model.state_dict(), spec, pp_rank=1, pp_size=2)
    assert torch.equal(last["output_layer.weight"][:101], model.state_dict()["model.embed_tokens.weight"])


def test_config_json_dicts_get_their_architecture_defaults():
    model = tiny("qwen2")
    from_dict = model_spec_from_hf({"model_type": "qwen2", **COMMON})
    assert from_dict == model_spec_from_hf(model.config)
    assert from_dict.qkv_bias and not from_dict.tied_embeddings and from_dict.rope_scaling_factor is None


@pytest.mark.parametrize("config, message", [
    (Qwen3Config(**COMMON, rope_scaling={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}),
     "rope_type='yarn'"),
    (LlamaConfig(**{**COMMON, "max_position_embeddings": 16384},
                 rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
     "rope_parameters.low_freq_factor=2.0"),
    (Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=64, max_window_layers=0), "sliding-window"),
    (LlamaConfig(**COMMON, attention_bias=True), "attention_bias=True"),
    (LlamaConfig(**COMMON, mlp_bias=True), "mlp_bias=True"),
    (LlamaConfig(**COMMON, hidden_act="gelu"), "hidden_act='gelu'"),
    ({"model_type": "gpt2"}, "model_type='gpt2'"),
])
def test_unsupported_configs_fail_before_building(config, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        model_spec_from_hf(config)


def test_tp_must_divide_the_query_groups():
    with pytest.raises(ValueError, match="parallel.tp=4 must divide num_key_value_heads=2"):
        model_spec_from_hf(tiny("qwen2").config, tp=4)


@pytest.mark.slow  # imports megatron-core
def test_llama3_rope_scaling_gives_hf_frequencies():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = tiny("llama3").config
    spec = model_spec_from_hf(config)
    kwargs = gpt_model_kwargs(spec)
    megatron = RotaryEmbedding(kv_channels=spec.head_dim, rotary_percent=1.0, rotary_base=kwargs["rotary_base"],
                               rope_scaling=kwargs["rope_scaling"], rope_scaling_factor=kwargs["rope_scaling_factor"],
                               use_cpu_initialization=True)
    hf_inv_freq, scale = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / 1e6 ** (torch.arange(0, spec.head_dim, 2, dtype=torch.float32) / spec.head_dim)
    assert scale == 1.0 and not torch.allclose(hf_inv_freq, plain)  # the scaling matters at this size
    torch.testing.assert_close(megatron.inv_freq, hf_inv_freq.float(), rtol=1e-6, atol=0)
