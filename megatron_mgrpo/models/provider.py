"""Building the megatron-core GPT model: Transformer Engine layers on GPU, local layers otherwise."""

from __future__ import annotations

import importlib.util

import torch

from megatron_mgrpo.models.hf_config import ModelSpec, transformer_config


def transformer_engine_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def build_gpt_model(spec: ModelSpec, *, tp: int = 1, pp: int = 1, pre_process: bool = True,
                    post_process: bool = True, params_dtype: torch.dtype = torch.float32):
    """One pipeline stage of the model (all of it when pp == 1), for the current parallel state."""
    from megatron.core.models.gpt import GPTModel

    if spec.tied_embeddings and pp > 1:
        raise ValueError("tied embeddings with parallel.pp > 1 are not supported yet: use parallel.pp=1")
    config = transformer_config(spec, tp=tp, pp=pp, params_dtype=params_dtype)
    if transformer_engine_available():
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        layer_spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=spec.qk_layernorm)
    else:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        layer_spec = get_gpt_layer_local_spec(qk_layernorm=spec.qk_layernorm, normalization="RMSNorm")
    return GPTModel(config, layer_spec, vocab_size=spec.padded_vocab_size,
                    max_sequence_length=spec.max_position_embeddings, pre_process=pre_process,
                    post_process=post_process, share_embeddings_and_output_weights=spec.tied_embeddings,
                    position_embedding_type="rope", rotary_base=int(spec.rope_theta), parallel_output=True)
