"""HF <-> Megatron maps of the MoE families (Qwen3-MoE, Mixtral), in one process."""

import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import MixtralConfig, Qwen3MoeConfig

from megatron_mgrpo.models.hf_config import model_spec_from_hf
from megatron_mgrpo.models.weight_map import (
    MOE_HF_NAMES,
    checkpoint_layout,
    hf_to_megatron,
    megatron_to_hf,
    merge_expert_shards,
)
from tests.helpers import MOE, tiny

KINDS = ("qwen3_moe", "mixtral")


def round_trip(hf, spec, tp, pp, ep, fused_norms=False):
    """HF -> every (pp, ep, tp) rank's shard -> HF, merging EP ranks as export does."""
    restored = {}
    for pp_rank in range(pp):
        grid = [[hf_to_megatron(hf, spec, tp_rank=t, tp_size=tp, pp_rank=pp_rank, pp_size=pp, ep_rank=e,
                                ep_size=ep, fused_norms=fused_norms) for t in range(tp)] for e in range(ep)]
        shards = [merge_expert_shards([grid[e][t] for e in range(ep)], spec) for t in range(tp)]
        restored.update(megatron_to_hf(shards, spec, pp_rank=pp_rank, pp_size=pp))
    return restored


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tp, pp, ep", [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2), (1, 1, 4), (2, 2, 2)])
def test_round_trip_is_bit_exact_with_every_expert(kind, tp, pp, ep):
    model = tiny(kind)
    spec = model_spec_from_hf(model.config, tp=tp)
    hf = checkpoint_layout(model.state_dict(), spec)
    restored = round_trip(model.state_dict(), spec, tp, pp, ep)
    assert restored.keys() == hf.keys()
    for name, tensor in hf.items():
        assert torch.equal(restored[name], tensor), name
    _, gate, up, down = MOE_HF_NAMES[kind]
    for layer in range(spec.num_layers):
        for e in range(spec.num_experts):
            for pattern in (gate, up, down):
                assert f"model.layers.{layer}.{pattern.format(e=e)}" in restored


@pytest.mark.parametrize("kind", KINDS)
def test_hf_names_are_the_checkpoint_names(kind, tmp_path):
    """save_pretrained writes one tensor per expert; `checkpoint_layout` gives exactly those."""
    model = tiny(kind)
    spec = model_spec_from_hf(model.config)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    ours = checkpoint_layout(model.state_dict(), spec)
    assert ours.keys() == saved.keys()
    for name, tensor in saved.items():
        assert torch.equal(ours[name], tensor), name
    assert checkpoint_layout(saved, spec) == saved  # already in checkpoint layout: unchanged


def test_experts_are_split_over_ep_ranks_and_tp_like_dense_mlps():
    model = tiny("qwen3_moe")
    spec = model_spec_from_hf(model.config, tp=2)
    hf = checkpoint_layout(model.state_dict(), spec)
    shard = hf_to_megatron(hf, spec, tp_rank=1, tp_size=2, ep_rank=1, ep_size=2)
    local = sorted({m.group(1) for n in shard for m in [re.search(r"local_experts\.(\d+)\.", n)] if m})
    assert local == ["0", "1"]  # 4 experts over 2 EP ranks
    fc1 = shard["decoder.layers.1.mlp.experts.local_experts.0.linear_fc1.weight"]  # global expert 2
    gate, up = hf["model.layers.1.mlp.experts.2.gate_proj.weight"], hf["model.layers.1.mlp.experts.2.up_proj.weight"]
    assert torch.equal(fc1, torch.cat([gate[16:], up[16:]]))  # [gate shard; up shard] of TP rank 1
    down = shard["decoder.layers.1.mlp.experts.local_experts.1.linear_fc2.weight"]  # global expert 3
    assert torch.equal(down, hf["model.layers.1.mlp.experts.3.down_proj.weight"][:, 16:])
    assert torch.equal(shard["decoder.layers.1.mlp.router.weight"], hf["model.layers.1.mlp.gate.weight"])


def test_te_names_fuse_only_the_attention_norm_of_moe_layers():
    model = tiny("mixtral")
    spec = model_spec_from_hf(model.config)
    shard = hf_to_megatron(model.state_dict(), spec, fused_norms=True)
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in shard
    assert "decoder.layers.0.pre_mlp_layernorm.weight" in shard  # the MoE layer keeps its own norm
    restored = round_trip(model.state_dict(), spec, 1, 1, 2, fused_norms=True)
    assert torch.equal(restored["model.layers.0.input_layernorm.weight"],
                       model.state_dict()["model.layers.0.input_layernorm.weight"])


def test_router_settings_follow_hf():
    qwen, unnormed, mixtral = (model_spec_from_hf(tiny(k).config) for k in ("qwen3_moe", "qwen3_moe_unnormed",
                                                                             "mixtral"))
    assert (qwen.num_experts, qwen.moe_topk, qwen.moe_ffn_hidden_size, qwen.moe_pre_softmax) == (4, 2, 32, False)
    assert qwen.qk_layernorm and not mixtral.qk_layernorm
    assert unnormed.moe_pre_softmax  # softmax over all experts, top-k probabilities used as they are
    assert (mixtral.num_experts, mixtral.moe_ffn_hidden_size, mixtral.moe_pre_softmax) == (4, 96, False)


@pytest.mark.parametrize("config, message", [
    (Qwen3MoeConfig(**MOE, num_experts=4, mlp_only_layers=[0]), "mlp_only_layers=[0]"),
    (Qwen3MoeConfig(**MOE, num_experts=4, decoder_sparse_step=2), "decoder_sparse_step=2"),
    (Qwen3MoeConfig(**MOE, num_experts=0), "num_experts=0"),
    (MixtralConfig(**MOE, router_jitter_noise=0.1), "router_jitter_noise=0.1"),
    (MixtralConfig(**MOE, sliding_window=64), "sliding-window"),
])
def test_unsupported_moe_configs_fail_before_building(config, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        model_spec_from_hf(config)


def test_tp_must_divide_the_expert_intermediate_size():
    with pytest.raises(ValueError, match="parallel.tp=2 must divide the expert intermediate size 33"):
        model_spec_from_hf(Qwen3MoeConfig(**MOE, num_experts=4, moe_intermediate_size=33), tp=2)


@pytest.mark.slow  # imports megatron-core
def test_transformer_config_maps_the_router_and_checks_ep():
    from megatron_mgrpo.models.hf_config import transformer_config

    spec = model_spec_from_hf(tiny("qwen3_moe_unnormed").config)
    config = transformer_config(spec, ep=2, routing_replay=True)
    assert (config.num_moe_experts, config.moe_router_topk, config.moe_ffn_hidden_size) == (4, 2, 32)
    assert config.moe_router_pre_softmax and config.moe_enable_routing_replay and not config.add_bias_linear
    assert config.moe_token_dispatcher_type == "allgather" and config.expert_model_parallel_size == 2
    assert config.moe_router_load_balancing_type == "none" and config.moe_shared_expert_intermediate_size is None
    with pytest.raises(ValueError, match="parallel.ep=3 must divide the number of experts 4"):
        transformer_config(spec, ep=3)
    with pytest.raises(ValueError, match="parallel.ep=2 / train.routing_replay=False need a MoE model"):
        transformer_config(model_spec_from_hf(tiny("qwen3").config), ep=2)
