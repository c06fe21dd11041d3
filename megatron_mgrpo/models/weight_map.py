"""HF <-> Megatron weight layout for dense Llama / Qwen2 / Qwen3 (megatron-core local layer spec).

Pure tensor functions, no I/O and no collectives, so they are testable in one process:
`hf_to_megatron` cuts full HF tensors into one rank's shard; `megatron_to_hf` glues the shards
of every TP rank of one pipeline stage back into HF tensors.

Layout facts (checked against HF logits): q/k/v are packed into `linear_qkv` per query group as
[that group's q heads; its k head; its v head], and TP splits whole groups; gate and up are
stacked into `linear_fc1` per TP rank as [gate shard; up shard]; column-parallel weights
(qkv, fc1, embedding and output layer by vocabulary) split dim 0, row-parallel ones (attention
output, fc2) dim 1; norms are replicated. The vocabulary is padded to a multiple of 128 x TP:
padded rows are zero on load and dropped on export. With tied embeddings and several pipeline
stages the last stage holds a copy of the embedding as its output layer (megatron keeps the two
in step); export reads the embedding only. Transformer Engine layers fuse each pre-norm into the
linear after it, so the two layer norms have other names there (`TE_FUSED_NORMS`).
"""

from __future__ import annotations

import torch

from megatron_mgrpo.models.hf_config import ModelSpec

#: (local layer spec name, Transformer Engine layer spec name) of the norms TE fuses into a linear.
TE_FUSED_NORMS = (("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"),
                  ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"))


def stage_layers(spec: ModelSpec, pp_rank: int, pp_size: int) -> range:
    """Global indices of the transformer layers held by pipeline stage `pp_rank`."""
    per_stage = spec.num_layers // pp_size
    return range(pp_rank * per_stage, (pp_rank + 1) * per_stage)


def _pack_qkv(spec: ModelSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    per_group = spec.num_heads // spec.num_query_groups
    rest = q.shape[1:]
    q = q.reshape(spec.num_query_groups, per_group * spec.head_dim, *rest)
    k = k.reshape(spec.num_query_groups, spec.head_dim, *rest)
    v = v.reshape(spec.num_query_groups, spec.head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def _unpack_qkv(spec: ModelSpec, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    per_group = spec.num_heads // spec.num_query_groups
    rest = qkv.shape[1:]
    grouped = qkv.reshape(spec.num_query_groups, (per_group + 2) * spec.head_dim, *rest)
    q, k, v = grouped.split([per_group * spec.head_dim, spec.head_dim, spec.head_dim], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def _pad_vocab(spec: ModelSpec, weight: torch.Tensor) -> torch.Tensor:
    padded = weight.new_zeros(spec.padded_vocab_size, weight.shape[1])
    padded[:spec.vocab_size] = weight
    return padded


def hf_to_megatron(hf: dict[str, torch.Tensor], spec: ModelSpec, *, tp_rank: int = 0, tp_size: int = 1,
                   pp_rank: int = 0, pp_size: int = 1, fused_norms: bool = False) -> dict[str, torch.Tensor]:
    """The local Megatron state dict of rank (tp_rank, pp_rank) from full HF tensors.

    `fused_norms` names the layer norms as the Transformer Engine layer spec does.
    """
    def col(t):
        return t.chunk(tp_size, dim=0)[tp_rank].clone()

    def row(t):
        return t.chunk(tp_size, dim=1)[tp_rank].clone()

    out = {}
    if pp_rank == 0:
        out["embedding.word_embeddings.weight"] = col(_pad_vocab(spec, hf["model.embed_tokens.weight"]))
    for local, layer in enumerate(stage_layers(spec, pp_rank, pp_size)):
        h, m = f"model.layers.{layer}.", f"decoder.layers.{local}."
        out[m + "input_layernorm.weight"] = hf[h + "input_layernorm.weight"].clone()
        out[m + "self_attention.linear_qkv.weight"] = col(_pack_qkv(
            spec, hf[h + "self_attn.q_proj.weight"], hf[h + "self_attn.k_proj.weight"], hf[h + "self_attn.v_proj.weight"]))
        if spec.qkv_bias:
            out[m + "self_attention.linear_qkv.bias"] = col(_pack_qkv(
                spec, hf[h + "self_attn.q_proj.bias"], hf[h + "self_attn.k_proj.bias"], hf[h + "self_attn.v_proj.bias"]))
        if spec.qk_layernorm:
            out[m + "self_attention.q_layernorm.weight"] = hf[h + "self_attn.q_norm.weight"].clone()
            out[m + "self_attention.k_layernorm.weight"] = hf[h + "self_attn.k_norm.weight"].clone()
        out[m + "self_attention.linear_proj.weight"] = row(hf[h + "self_attn.o_proj.weight"])
        out[m + "pre_mlp_layernorm.weight"] = hf[h + "post_attention_layernorm.weight"].clone()
        out[m + "mlp.linear_fc1.weight"] = torch.cat([col(hf[h + "mlp.gate_proj.weight"]),
                                                       col(hf[h + "mlp.up_proj.weight"])])
        out[m + "mlp.linear_fc2.weight"] = row(hf[h + "mlp.down_proj.weight"])
        if fused_norms:
            for local_name, te_name in TE_FUSED_NORMS:
                out[m + te_name] = out.pop(m + local_name)
    if pp_rank == pp_size - 1:
        out["decoder.final_layernorm.weight"] = hf["model.norm.weight"].clone()
        if not spec.tied_embeddings:
            out["output_layer.weight"] = col(_pad_vocab(spec, hf["lm_head.weight"]))
        elif pp_size > 1:  # the last stage's copy of the tied embedding
            out["output_layer.weight"] = col(_pad_vocab(spec, hf["model.embed_tokens.weight"]))
    return out


def megatron_to_hf(shards: list[dict[str, torch.Tensor]], spec: ModelSpec, *, pp_rank: int = 0,
                   pp_size: int = 1) -> dict[str, torch.Tensor]:
    """Full HF tensors of one pipeline stage from the state dicts of all its TP ranks (in rank order)."""
    out = edge_to_hf(shards, spec)
    for local, layer in enumerate(stage_layers(spec, pp_rank, pp_size)):
        prefix = f"decoder.layers.{local}."
        out.update(layer_to_hf([{n[len(prefix):]: t for n, t in s.items() if n.startswith(prefix)} for s in shards],
                               spec, layer))
    return out


def edge_to_hf(shards: list[dict[str, torch.Tensor]], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Embedding, final norm and output layer (whichever this stage holds) in HF names."""
    first, out = shards[0], {}
    if "embedding.word_embeddings.weight" in first:
        out["model.embed_tokens.weight"] = _cat(shards, "embedding.word_embeddings.weight", 0)[:spec.vocab_size]
    if "decoder.final_layernorm.weight" in first:
        out["model.norm.weight"] = first["decoder.final_layernorm.weight"]
    if "output_layer.weight" in first and not spec.tied_embeddings:
        out["lm_head.weight"] = _cat(shards, "output_layer.weight", 0)[:spec.vocab_size]
    return out


def layer_to_hf(shards: list[dict[str, torch.Tensor]], spec: ModelSpec, layer: int) -> dict[str, torch.Tensor]:
    """One transformer layer in HF names from its TP shards (names relative to the layer)."""
    first, h, out = shards[0], f"model.layers.{layer}.", {}
    input_norm, pre_mlp_norm = (te if te in first else local for local, te in TE_FUSED_NORMS)
    out[h + "input_layernorm.weight"] = first[input_norm]
    q, k, v = _unpack_qkv(spec, _cat(shards, "self_attention.linear_qkv.weight", 0))
    out.update({h + "self_attn.q_proj.weight": q, h + "self_attn.k_proj.weight": k, h + "self_attn.v_proj.weight": v})
    if spec.qkv_bias:
        q, k, v = _unpack_qkv(spec, _cat(shards, "self_attention.linear_qkv.bias", 0))
        out.update({h + "self_attn.q_proj.bias": q, h + "self_attn.k_proj.bias": k, h + "self_attn.v_proj.bias": v})
    if spec.qk_layernorm:
        out[h + "self_attn.q_norm.weight"] = first["self_attention.q_layernorm.weight"]
        out[h + "self_attn.k_norm.weight"] = first["self_attention.k_layernorm.weight"]
    out[h + "self_attn.o_proj.weight"] = _cat(shards, "self_attention.linear_proj.weight", 1)
    out[h + "post_attention_layernorm.weight"] = first[pre_mlp_norm]
    halves = [s["mlp.linear_fc1.weight"].chunk(2, dim=0) for s in shards]
    out[h + "mlp.gate_proj.weight"] = _join([gate for gate, _ in halves], 0)
    out[h + "mlp.up_proj.weight"] = _join([up for _, up in halves], 0)
    out[h + "mlp.down_proj.weight"] = _cat(shards, "mlp.linear_fc2.weight", 1)
    return out


def _cat(shards: list[dict[str, torch.Tensor]], name: str, dim: int) -> torch.Tensor:
    return _join([s[name] for s in shards], dim)


def _join(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    """Concatenate TP parts; a single part is returned as is (a view, no copy)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)
