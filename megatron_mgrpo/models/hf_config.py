"""Hugging Face config -> megatron-core TransformerConfig and GPTModel settings.

Every setting the dense Llama / Qwen2 / Qwen3 families use is mapped explicitly; anything else
(other rope scalings, sliding windows, biases in odd places, activations) fails here, before a
model is built or a tensor written, because a silently mis-mapped setting gives a model that
loads, runs and is wrong. MoE families slot in as further `model_type`s with expert fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

ARCHITECTURES = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}
#: megatron-core's Llama-3 RoPE scaling has these constants built in; HF configs carry them.
MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


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
    rope_scaling_factor: float | None  # Llama-3 style frequency scaling; None for plain RoPE
    norm_eps: float
    qk_layernorm: bool
    qkv_bias: bool
    tied_embeddings: bool


def padded_vocab(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    """Megatron pads the vocabulary so that every TP rank holds an equal, aligned slice."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def _rope(config) -> tuple[float, float | None]:
    """(rope base, Llama-3 scaling factor or None), or an error for a RoPE megatron would get wrong."""
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    theta = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    if rope_type == "default":
        return theta, None
    if rope_type == "llama3":
        for key, expected in MEGATRON_LLAMA3_ROPE.items():
            if float(rope.get(key, expected)) != expected:
                raise ValueError(f"rope_parameters.{key}={rope[key]} is not supported: megatron-core's Llama-3 "
                                 f"RoPE scaling is fixed to {key}={expected}")
        return theta, float(rope["factor"])
    raise ValueError(f"rope_type={rope_type!r} ({config.model_type}) is not mapped to megatron-core yet; "
                     f"supported: default, llama3")


def model_spec_from_hf(hf_config: Any, tp: int = 1) -> ModelSpec:
    """Read a transformers config (object or config.json dict) of a supported dense model."""
    is_dict = isinstance(hf_config, dict)
    model_type = hf_config.get("model_type") if is_dict else getattr(hf_config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(f"model_type={model_type!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    if is_dict:  # a config.json dict gets its architecture's own defaults, as transformers would give it
        from transformers import AutoConfig

        config = AutoConfig.for_model(**hf_config)
    else:
        config = hf_config
    theta, scaling = _rope(config)
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if getattr(config, "use_sliding_window", False) or layer_types != {"full_attention"}:
        raise ValueError(f"{model_type} with sliding-window attention (use_sliding_window / layer_types="
                         f"{sorted(layer_types)}) is not supported: only full attention maps to megatron-core")
    if config.hidden_act != "silu":
        raise ValueError(f"hidden_act={config.hidden_act!r} is not supported (SwiGLU with silu only)")
    if getattr(config, "mlp_bias", False):
        raise ValueError("mlp_bias=True is not supported: megatron's add_bias_linear would also bias the attention")
    if model_type != "qwen2" and getattr(config, "attention_bias", False):
        raise ValueError(f"attention_bias=True ({model_type}) is not supported: it biases o_proj too, which "
                         f"megatron's add_qkv_bias does not")
    heads = config.num_attention_heads
    groups = getattr(config, "num_key_value_heads", None) or heads
    if groups % tp:
        raise ValueError(f"parallel.tp={tp} must divide num_key_value_heads={groups}")
    return ModelSpec(
        model_type=model_type, num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
        num_heads=heads, num_query_groups=groups,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        ffn_hidden_size=config.intermediate_size, vocab_size=config.vocab_size,
        padded_vocab_size=padded_vocab(config.vocab_size, tp), max_position_embeddings=config.max_position_embeddings,
        rope_theta=theta, rope_scaling_factor=scaling, norm_eps=config.rms_norm_eps,
        qk_layernorm=model_type == "qwen3", qkv_bias=model_type == "qwen2",
        tied_embeddings=bool(config.tie_word_embeddings))


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


def gpt_model_kwargs(spec: ModelSpec) -> dict[str, Any]:
    """GPTModel's own arguments (besides config, layer spec and pipeline position) for `spec`."""
    return dict(vocab_size=spec.padded_vocab_size, max_sequence_length=spec.max_position_embeddings,
                share_embeddings_and_output_weights=spec.tied_embeddings, position_embedding_type="rope",
                rotary_base=spec.rope_theta, rope_scaling=spec.rope_scaling_factor is not None,
                rope_scaling_factor=spec.rope_scaling_factor or 1.0, parallel_output=True)
