import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from megatron_mgrpo.models.hf_config import model_spec_from_hf, padded_vocab
from megatron_mgrpo.models.weight_map import hf_to_megatron, megatron_to_hf

COMMON = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)


def tiny(kind: str, tied: bool = False):
    torch.manual_seed(0)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**COMMON, tie_word_embeddings=tied))
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**COMMON, tie_word_embeddings=tied))
    return Qwen3ForCausalLM(Qwen3Config(**COMMON, head_dim=16, tie_word_embeddings=tied))


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_round_trip_is_bit_exact(kind, tp, pp):
    model = tiny(kind)
    hf = model.state_dict()
    spec = model_spec_from_hf(model.config, tp=tp)
    restored = {}
    for pp_rank in range(pp):
        shards = [hf_to_megatron(hf, spec, tp_rank=r, tp_size=tp, pp_rank=pp_rank, pp_size=pp) for r in range(tp)]
        restored.update(megatron_to_hf(shards, spec, pp_rank=pp_rank, pp_size=pp))
    assert restored.keys() == hf.keys()
    for name, tensor in hf.items():
        assert torch.equal(restored[name], tensor), name


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


def test_tied_embeddings_and_unsupported_configs():
    model = tiny("llama", tied=True)
    spec = model_spec_from_hf(model.config)
    assert spec.tied_embeddings and "output_layer.weight" not in hf_to_megatron(model.state_dict(), spec)
    config = Qwen3Config(**COMMON, rope_scaling={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6})
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        model_spec_from_hf(config)
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        model_spec_from_hf({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="parallel.tp=4 must divide num_key_value_heads=2"):
        model_spec_from_hf(tiny("qwen2").config, tp=4)
