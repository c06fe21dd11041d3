"""Hugging Face config -> megatron-core TransformerConfig and GPTModel settings.

Every setting the dense Llama / Qwen2 / Qwen3 families and the MoE families Qwen3-MoE and Mixtral
use is mapped explicitly; anything else (other rope scalings, sliding windows, biases in odd
places, activations, dense layers between MoE layers, router noise) fails here, before a model is
built or a tensor written, because a silently mis-mapped setting gives a model that loads, runs
and is wrong. FP8 compute (Transformer Engine, GPU only) is requested through `fp8_settings`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import torch

ARCHITECTURES = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "qwen3_moe": "Qwen3-MoE", "mixtral": "Mixtral"}
MOE_ARCHITECTURES = ("qwen3_moe", "mixtral")
FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise")
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
    num_experts: int = 0  # routed experts of every layer's MoE block; 0: a dense MLP in every layer
    moe_ffn_hidden_size: int = 0  # intermediate size of one expert
    moe_topk: int = 0  # experts per token
    # True: softmax over all experts, then top-k, probabilities used as they are (Qwen3-MoE with
    # norm_topk_prob=False); False: top-k of the logits, softmax over those k, which equals HF's
    # softmax, top-k, renormalise (Mixtral; Qwen3-MoE with norm_topk_prob=True)
    moe_pre_softmax: bool = False


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


def _moe(config) -> dict[str, Any]:
    """The expert fields of a ModelSpec for a MoE family, or an error for a layout megatron would get wrong."""
    if config.model_type == "mixtral":
        if config.router_jitter_noise:
            raise ValueError(f"router_jitter_noise={config.router_jitter_noise} (mixtral) is not supported: HF "
                             f"scales the expert inputs too, megatron's moe_input_jitter_eps only the router's; "
                             f"supported: 0.0")
        return dict(num_experts=config.num_local_experts, moe_ffn_hidden_size=config.intermediate_size,
                    moe_topk=config.num_experts_per_tok, moe_pre_softmax=False)
    if config.decoder_sparse_step != 1 or config.mlp_only_layers:
        raise ValueError(f"decoder_sparse_step={config.decoder_sparse_step}, mlp_only_layers={config.mlp_only_layers} "
                         f"(qwen3_moe) mixes dense and MoE layers, which is not supported; supported: every layer "
                         f"MoE (decoder_sparse_step=1, mlp_only_layers=[])")
    if not config.num_experts:
        raise ValueError("num_experts=0 (qwen3_moe) has no experts; supported: num_experts >= 1")
    return dict(num_experts=config.num_experts, moe_ffn_hidden_size=config.moe_intermediate_size,
                moe_topk=config.num_experts_per_tok, moe_pre_softmax=not config.norm_topk_prob)


def model_spec_from_hf(hf_config: Any, tp: int = 1) -> ModelSpec:
    """Read a transformers config (object or config.json dict) of a supported model."""
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
    sliding = getattr(config, "use_sliding_window", False) or (model_type == "mixtral" and config.sliding_window)
    if sliding or layer_types != {"full_attention"}:
        raise ValueError(f"{model_type} with sliding-window attention (use_sliding_window / sliding_window / "
                         f"layer_types={sorted(layer_types)}) is not supported: only full attention maps to "
                         f"megatron-core")
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
    moe = _moe(config) if model_type in MOE_ARCHITECTURES else {}
    if moe and moe["moe_ffn_hidden_size"] % tp:
        raise ValueError(f"parallel.tp={tp} must divide the expert intermediate size {moe['moe_ffn_hidden_size']} "
                         f"(experts are split over TP like dense MLPs)")
    return ModelSpec(
        model_type=model_type, num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
        num_heads=heads, num_query_groups=groups,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        ffn_hidden_size=config.intermediate_size, vocab_size=config.vocab_size,
        padded_vocab_size=padded_vocab(config.vocab_size, tp), max_position_embeddings=config.max_position_embeddings,
        rope_theta=theta, rope_scaling_factor=scaling, norm_eps=config.rms_norm_eps,
        qk_layernorm=model_type in ("qwen3", "qwen3_moe"), qkv_bias=model_type == "qwen2",
        tied_embeddings=bool(config.tie_word_embeddings), **moe)


def transformer_config(spec: ModelSpec, *, tp: int = 1, pp: int = 1, ep: int = 1,
                       params_dtype: torch.dtype = torch.float32, routing_replay: bool = False,
                       fp8: dict[str, Any] | None = None):
    """The megatron-core TransformerConfig for `spec` (no fusions that need CUDA kernels).

    `routing_replay` lets `train.routing_replay` record and impose the experts of every token;
    `fp8` holds the fields from `fp8_settings`.
    """
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
        pipeline_dtype=params_dtype, use_cpu_initialization=not torch.cuda.is_available(),
        **_moe_config(spec, ep, routing_replay), **(fp8 or {}))


def _moe_config(spec: ModelSpec, ep: int, routing_replay: bool) -> dict[str, Any]:
    """TransformerConfig's expert fields: HF's router (softmax, top-k, no bias, no load-balancing
    loss, which RL from a pretrained MoE does not use), experts split over `ep` ranks.

    Router probabilities are computed in fp32 as HF does. The allgather token dispatcher is the
    one that runs on CPU (alltoall needs CUDA streams); on GPU alltoall is the faster choice for EP.
    """
    if not spec.num_experts:
        if ep > 1 or routing_replay:
            raise ValueError(f"parallel.ep={ep} / train.routing_replay={routing_replay} need a MoE model, and "
                             f"{spec.model_type} is dense: use parallel.ep=1 and train.routing_replay=false")
        return {}
    if spec.num_experts % ep:
        raise ValueError(f"parallel.ep={ep} must divide the number of experts {spec.num_experts}")
    return dict(num_moe_experts=spec.num_experts, moe_ffn_hidden_size=spec.moe_ffn_hidden_size,
                moe_router_topk=spec.moe_topk, moe_router_pre_softmax=spec.moe_pre_softmax,
                moe_router_score_function="softmax", moe_router_dtype="fp32",
                moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0, moe_grouped_gemm=False,
                moe_token_dispatcher_type="alltoall" if torch.cuda.is_available() else "allgather",
                moe_enable_routing_replay=routing_replay, expert_model_parallel_size=ep)


def fp8_settings(fmt: str = "off", recipe: str = "delayed", params: bool = False) -> dict[str, Any]:
    """TransformerConfig fields for `model.fp8`, `model.fp8_recipe` and `model.fp8_params` ({} when off).

    FP8 compute exists only in Transformer Engine layers on a GPU; asking for it elsewhere is an
    error here rather than a model that silently trains in higher precision.
    """
    if fmt == "off":
        if params:
            raise ValueError("model.fp8_params=true needs FP8 compute: set model.fp8 to e4m3 or hybrid")
        return {}
    if fmt not in FP8_FORMATS:
        raise ValueError(f"model.fp8={fmt!r} is not supported; supported: off, {', '.join(FP8_FORMATS)}")
    if recipe not in FP8_RECIPES:
        raise ValueError(f"model.fp8_recipe={recipe!r} is not supported; supported: {', '.join(FP8_RECIPES)}")
    if not torch.cuda.is_available():
        raise ValueError(f"model.fp8={fmt} needs a CUDA GPU with Transformer Engine, and no GPU is visible: run on "
                         f"a GPU with the `gpu` extra installed, or set model.fp8=off")
    if not transformer_engine_available():
        raise ValueError(f"model.fp8={fmt} needs Transformer Engine, which is not installed: install the `gpu` "
                         f"extra (pip install 'megatron_mgrpo[gpu]'), or set model.fp8=off")
    return dict(fp8=fmt, fp8_recipe=recipe, fp8_param=params)


def transformer_engine_available() -> bool:
    """TE layers need CUDA; checked without importing TE, which is heavy and GPU-only."""
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def gpt_model_kwargs(spec: ModelSpec) -> dict[str, Any]:
    """GPTModel's own arguments (besides config, layer spec and pipeline position) for `spec`."""
    return dict(vocab_size=spec.padded_vocab_size, max_sequence_length=spec.max_position_embeddings,
                share_embeddings_and_output_weights=spec.tied_embeddings, position_embedding_type="rope",
                rotary_base=spec.rope_theta, rope_scaling=spec.rope_scaling_factor is not None,
                rope_scaling_factor=spec.rope_scaling_factor or 1.0, parallel_output=True)
