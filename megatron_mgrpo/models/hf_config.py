"""Hugging Face config -> megatron-core TransformerConfig and GPTModel settings.

Every setting the dense Llama / Qwen2 / Qwen3 families use is mapped explicitly; anything else
(other rope scalings, sliding windows, biases in odd places, activations) fails here, before a
model is built or a tensor written, because a silently mis-mapped setting gives a model that
loads, runs and is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

ARCHITECTURES = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}


@dataclass(frozen=True)
class ModelSpec:
    """What is needed to build the Megatron model and to map its weights."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_query_groups: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    padded_vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    norm_eps: float
    qk_layernorm: bool
    qkv_bias: bool
    tied_embeddings: bool


def padded_vocab(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    """Megatron pads the vocabulary so that every TP rank holds an equal, aligned slice."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def model_spec_from_hf(hf_config: Any, tp: int = 1) -> ModelSpec:
    """Read a transformers config (object or config.json dict) for a supported dense model."""
    get = hf_config.get if isinstance(hf_config, dict) else lambda key, default=None: getattr(hf_config, key, default)
    model_type = get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"model_type={model_type!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    rope = get("rope_parameters") or get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"rope_type={rope_type!r} ({model_type}) is not mapped to megatron-core yet; "
                         f"only the default RoPE is supported")
    if get("use_sliding_window", False):
        raise ValueError(f"{model_type} with use_sliding_window=True is not supported")
    if get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={get('hidden_act')!r} is not supported (SwiGLU with silu only)")
    if get("mlp_bias", False):
        raise ValueError("mlp_bias=True is not supported")
    heads, groups = get("num_attention_heads"), get("num_key_value_heads") or get("num_attention_heads")
    if groups % tp:
        raise ValueError(f"parallel.tp={tp} must divide num_key_value_heads={groups}")
    return ModelSpec(
        model_type=model_type, num_layers=get("num_hidden_layers"), hidden_size=get("hidden_size"),
        num_heads=heads, num_query_groups=groups, head_dim=get("head_dim") or get("hidden_size") // heads,
        ffn_hidden_size=get("intermediate_size"), vocab_size=get("vocab_size"),
        padded_vocab_size=padded_vocab(get("vocab_size"), tp),
        max_position_embeddings=get("max_position_embeddings"),
        rope_theta=float(rope.get("rope_theta", get("rope_theta", 10000.0))), norm_eps=get("rms_norm_eps"),
        qk_layernorm=model_type == "qwen3",
        qkv_bias=model_type == "qwen2" or bool(get("attention_bias", False)),
        tied_embeddings=bool(get("tie_word_embeddings", False)))


def transformer_config(spec: ModelSpec, *, tp: int = 1, pp: int = 1, params_dtype: torch.dtype = torch.float32):
    """The megatron-core TransformerConfig for `spec` (no fusions that need CUDA kernels)."""
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    if spec.num_layers % pp:
        raise ValueError(f"parallel.pp={pp} must divide num_hidden_layers={spec.num_layers}")
    return TransformerConfig(
        num_layers=spec.num_layers, hidden_size=spec.hidden_size, num_attention_heads=spec.num_heads,
        num_query_groups=spec.num_query_groups, kv_channels=spec.head_dim, ffn_hidden_size=spec.ffn_hidden_size,
        normalization="RMSNorm", layernorm_epsilon=spec.norm_eps, qk_layernorm=spec.qk_layernorm,
        add_qkv_bias=spec.qkv_bias, add_bias_linear=False, gated_linear_unit=True, activation_func=F.silu,
        hidden_dropout=0.0, attention_dropout=0.0, attention_softmax_in_fp32=True,
        bias_activation_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
        masked_softmax_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, params_dtype=params_dtype,
        pipeline_dtype=params_dtype, use_cpu_initialization=not torch.cuda.is_available())
