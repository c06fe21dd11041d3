"""Building the megatron-core GPT model (Transformer Engine layers on GPU, local layers otherwise)
and loading Hugging Face weights into the shard this process holds."""

from __future__ import annotations

from typing import Any

import torch

from megatron_mgrpo.models.hf_config import (
    ModelSpec,
    gpt_model_kwargs,
    transformer_config,
    transformer_engine_available,
)
from megatron_mgrpo.models.weight_map import TE_FUSED_NORMS, hf_to_megatron


def build_gpt_model(spec: ModelSpec, *, tp: int = 1, pp: int = 1, ep: int = 1, pre_process: bool = True,
                    post_process: bool = True, params_dtype: torch.dtype = torch.float32,
                    routing_replay: bool = False, fp8: dict[str, Any] | None = None):
    """One pipeline stage of the model (all of it when pp == 1), for the current parallel state.

    MoE models get megatron's MoE layer with one module per local expert (no grouped GEMM, so
    the expert names are the same with and without Transformer Engine); `routing_replay` and
    `fp8` are passed on to `transformer_config`.
    """
    from megatron.core.models.gpt import GPTModel, gpt_layer_specs

    config = transformer_config(spec, tp=tp, pp=pp, ep=ep, params_dtype=params_dtype,
                                routing_replay=routing_replay, fp8=fp8)
    experts = dict(num_experts=spec.num_experts, moe_grouped_gemm=False) if spec.num_experts else {}
    if transformer_engine_available():
        layer_spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=spec.qk_layernorm,
                                                                                **experts)
    else:
        layer_spec = gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=spec.qk_layernorm, normalization="RMSNorm",
                                                              **experts)
    model = GPTModel(config, layer_spec, pre_process=pre_process, post_process=post_process, **gpt_model_kwargs(spec))
    for name, param in model.named_parameters():
        if ".experts." in name:
            # megatron marks experts (allreduce=False) only at EP > 1, so at EP = 1 the optimizer is
            # not split into a dense and an expert part and its state would not reshard to EP > 1;
            # at EP = 1 the expert data-parallel group is the data-parallel group, so nothing else changes
            param.allreduce = False
    return model


def load_hf_weights(model: torch.nn.Module, hf: dict[str, torch.Tensor], spec: ModelSpec) -> None:
    """Copy full HF tensors into this rank's shard of `model` (TP / PP / EP rank from megatron's state).

    The load is strict: a name that the map produces but the model lacks, or a model weight the
    map does not produce, is an error listing them, because a partially loaded model still runs.
    """
    from megatron.core import parallel_state as ps

    expected = model.state_dict()
    fused_norms = any(name.endswith(te_name) for name in expected for _, te_name in TE_FUSED_NORMS)
    shard = hf_to_megatron(hf, spec, tp_rank=ps.get_tensor_model_parallel_rank(),
                           tp_size=ps.get_tensor_model_parallel_world_size(),
                           pp_rank=ps.get_pipeline_model_parallel_rank(),
                           pp_size=ps.get_pipeline_model_parallel_world_size(),
                           ep_rank=ps.get_expert_model_parallel_rank(),
                           ep_size=ps.get_expert_model_parallel_world_size(), fused_norms=fused_norms)
    missing, unexpected = model.load_state_dict(shard, strict=False)
    missing = [name for name in missing if not name.endswith("_extra_state")]  # TE's FP8 metadata
    if missing or unexpected:
        raise ValueError(f"HF -> Megatron map does not fit the {spec.model_type} model: model weights not "
                         f"loaded {missing}, mapped names the model lacks {unexpected}")
