"""HF <-> Megatron weight layout for Llama / Qwen2 / Qwen3 and the MoE families Qwen3-MoE and
Mixtral (megatron-core local layer spec).

Pure tensor functions, no I/O and no collectives, so they are testable in one process:
`hf_to_megatron` cuts full HF tensors into one rank's shard; `megatron_to_hf` glues the shards
of every TP rank of one pipeline stage back into HF tensors (with expert parallelism, merge the
EP ranks' shards first with `merge_expert_shards`).

Layout facts (checked against HF logits): q/k/v are packed into `linear_qkv` per query group as
[that group's q heads; its k head; its v head], and TP splits whole groups; gate and up are
stacked into `linear_fc1` per TP rank as [gate shard; up shard]; column-parallel weights
(qkv, fc1, embedding and output layer by vocabulary) split dim 0, row-parallel ones (attention
output, fc2) dim 1; norms are replicated. The vocabulary is padded to a multiple of 128 x TP:
padded rows are zero on load and dropped on export. With tied embeddings and several pipeline
stages the last stage holds a copy of the embedding as its output layer (megatron keeps the two
in step); export reads the embedding only. Transformer Engine layers fuse each pre-norm into the
linear after it, so the two layer norms have other names there (`TE_FUSED_NORMS`); a MoE layer
keeps its pre-MLP norm apart, since the router and experts are no TE LayerNormLinear.

MoE: HF names are those of the checkpoint files and of the rollout engines (one tensor per expert
and projection, `MOE_HF_NAMES`); transformers 5 keeps experts fused in memory
(`mlp.experts.gate_up_proj` [experts, 2 x intermediate, hidden], `mlp.experts.down_proj`), which
`checkpoint_layout` splits. Megatron holds a layer's router as `mlp.router.weight` (replicated
over TP and EP) and expert e as `mlp.experts.local_experts.{i}` on EP rank e // (experts / EP),
i = e % (experts / EP); each expert is split over TP like a dense MLP (expert TP = TP).
"""

from __future__ import annotations

import re

import torch

from megatron_mgrpo.models.hf_config import ModelSpec

#: (local layer spec name, Transformer Engine layer spec name) of the norms TE fuses into a linear.
TE_FUSED_NORMS = (("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"),
                  ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"))
#: Per MoE family, the HF checkpoint names (relative to a layer) of the router and of expert {e}'s
#: gate, up and down projections.
MOE_HF_NAMES = {
    "qwen3_moe": ("mlp.gate.weight", "mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight",
                  "mlp.experts.{e}.down_proj.weight"),
    "mixtral": ("block_sparse_moe.gate.weight", "block_sparse_moe.experts.{e}.w1.weight",
                "block_sparse_moe.experts.{e}.w3.weight", "block_sparse_moe.experts.{e}.w2.weight"),
}
_LOCAL_EXPERT = re.compile(r"(^|\.)mlp\.experts\.local_experts\.(\d+)\.")


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


def fused_norm_names(spec: ModelSpec) -> tuple[tuple[str, str], ...]:
    """The (local, TE) names of the norms the Transformer Engine layer spec fuses for `spec`."""
    return TE_FUSED_NORMS[:1] if spec.num_experts else TE_FUSED_NORMS


def checkpoint_layout(hf: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """`hf` with transformers' fused in-memory experts split into the checkpoint's per-expert
    names (views, no copies); a state dict already in checkpoint layout is returned unchanged."""
    if not spec.num_experts or not any(name.endswith("mlp.experts.gate_up_proj") for name in hf):
        return hf  # also keeps a lazy reader of checkpoint files lazy
    router, gate, up, down = MOE_HF_NAMES[spec.model_type]
    out = dict(hf)
    for layer in range(spec.num_layers):
        h = f"model.layers.{layer}."
        if h + "mlp.experts.gate_up_proj" not in out:
            continue
        out[h + router] = out.pop(h + "mlp.gate.weight")
        gate_up, down_proj = out.pop(h + "mlp.experts.gate_up_proj"), out.pop(h + "mlp.experts.down_proj")
        for e in range(spec.num_experts):
            out[h + gate.format(e=e)], out[h + up.format(e=e)] = gate_up[e].chunk(2, dim=0)
            out[h + down.format(e=e)] = down_proj[e]
    return out


def checkpoint_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A transformers model's parameters and persistent buffers under the names of its checkpoint
    files (the names every export writes). Fused in-memory experts appear as per-expert views,
    so copying a tensor into its entry updates the model in place; tied weights appear under
    each of their names."""
    from megatron_mgrpo.models.hf_config import model_spec_from_hf

    tensors = model.state_dict(keep_vars=True)
    if getattr(model.config, "num_experts_per_tok", None):
        tensors = checkpoint_layout(tensors, model_spec_from_hf(model.config))
    return tensors


@torch.no_grad()
def load_checkpoint_tensors(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy exported weights (checkpoint names) into a transformers model, strictly: every weight
    of the model must be given (a tied one under either of its names), and nothing else."""
    targets = checkpoint_tensors(model)
    unexpected = sorted(weights.keys() - targets.keys())
    covered = {t.data_ptr() for name, t in targets.items() if name in weights}  # tied names share storage
    missing = sorted(name for name, t in targets.items() if name not in weights and t.data_ptr() not in covered)
    if missing or unexpected:
        raise KeyError(f"weights do not fit {type(model).__name__}: missing {missing[:5]}, "
                       f"unexpected {unexpected[:5]}")
    for name, tensor in weights.items():
        targets[name].copy_(tensor)


def hf_to_megatron(hf: dict[str, torch.Tensor], spec: ModelSpec, *, tp_rank: int = 0, tp_size: int = 1,
                   pp_rank: int = 0, pp_size: int = 1, ep_rank: int = 0, ep_size: int = 1,
                   fused_norms: bool = False) -> dict[str, torch.Tensor]:
    """The local Megatron state dict of rank (tp_rank, pp_rank, ep_rank) from full HF tensors.

    `hf` may be in checkpoint or in transformers' in-memory layout. `fused_norms` names the layer
    norms as the Transformer Engine layer spec does.
    """
    def col(t):
        return t.chunk(tp_size, dim=0)[tp_rank].clone()

    def row(t):
        return t.chunk(tp_size, dim=1)[tp_rank].clone()

    def mlp(prefix: str, gate: str, up: str, down: str) -> None:
        out[prefix + "linear_fc1.weight"] = torch.cat([col(hf[gate]), col(hf[up])])
        out[prefix + "linear_fc2.weight"] = row(hf[down])

    hf = checkpoint_layout(hf, spec)
    out = {}
    if pp_rank == 0:
        out["embedding.word_embeddings.weight"] = col(_pad_vocab(spec, hf["model.embed_tokens.weight"]))
    for local, layer in enumerate(stage_layers(spec, pp_rank, pp_size)):
        h, m = f"model.layers.{layer}.", f"decoder.layers.{local}."
        out[m + "input_layernorm.weight"] = hf[h + "input_layernorm.weight"].clone()
        out[m + "self_attention.linear_qkv.weight"] = col(_pack_qkv(
            spec, hf[h + "self_attn.q_proj.weight"], hf[h + "self_attn.k_proj.weight"],
            hf[h + "self_attn.v_proj.weight"]))
        if spec.qkv_bias:
            out[m + "self_attention.linear_qkv.bias"] = col(_pack_qkv(
                spec, hf[h + "self_attn.q_proj.bias"], hf[h + "self_attn.k_proj.bias"],
                hf[h + "self_attn.v_proj.bias"]))
        if spec.qk_layernorm:
            out[m + "self_attention.q_layernorm.weight"] = hf[h + "self_attn.q_norm.weight"].clone()
            out[m + "self_attention.k_layernorm.weight"] = hf[h + "self_attn.k_norm.weight"].clone()
        out[m + "self_attention.linear_proj.weight"] = row(hf[h + "self_attn.o_proj.weight"])
        out[m + "pre_mlp_layernorm.weight"] = hf[h + "post_attention_layernorm.weight"].clone()
        if spec.num_experts:
            router, gate, up, down = MOE_HF_NAMES[spec.model_type]
            out[m + "mlp.router.weight"] = hf[h + router].clone()
            per_rank = spec.num_experts // ep_size
            for local_expert in range(per_rank):
                e = ep_rank * per_rank + local_expert
                mlp(f"{m}mlp.experts.local_experts.{local_expert}.", h + gate.format(e=e), h + up.format(e=e),
                    h + down.format(e=e))
        else:
            mlp(m + "mlp.", h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight", h + "mlp.down_proj.weight")
        if fused_norms:
            for local_name, te_name in fused_norm_names(spec):
                out[m + te_name] = out.pop(m + local_name)
    if pp_rank == pp_size - 1:
        out["decoder.final_layernorm.weight"] = hf["model.norm.weight"].clone()
        if not spec.tied_embeddings:
            out["output_layer.weight"] = col(_pad_vocab(spec, hf["lm_head.weight"]))
        elif pp_size > 1:  # the last stage's copy of the tied embedding
            out["output_layer.weight"] = col(_pad_vocab(spec, hf["model.embed_tokens.weight"]))
    return out


def merge_expert_shards(ep_shards: list[dict[str, torch.Tensor]], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """One TP rank's tensors as if EP were 1, from that TP rank's tensors on every EP rank (in EP
    rank order): local experts are renumbered to global ones, the rest is taken from EP rank 0.

    Names may be full or relative to a layer; the result feeds `megatron_to_hf` / `layer_to_hf`.
    """
    per_rank = spec.num_experts // len(ep_shards) if spec.num_experts else 0
    out = {}
    for ep_rank, shard in enumerate(ep_shards):
        for name, tensor in shard.items():
            match = _LOCAL_EXPERT.search(name)
            if match:
                e = ep_rank * per_rank + int(match.group(2))
                out[name[:match.start(2)] + str(e) + name[match.end(2):]] = tensor
            elif ep_rank == 0:
                out[name] = tensor
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
    if not spec.num_experts:
        out.update(_mlp_to_hf(shards, "mlp.", h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight",
                              h + "mlp.down_proj.weight"))
        return out
    router, gate, up, down = MOE_HF_NAMES[spec.model_type]
    out[h + router] = first["mlp.router.weight"]
    for e in range(spec.num_experts):
        out.update(_mlp_to_hf(shards, f"mlp.experts.local_experts.{e}.", h + gate.format(e=e), h + up.format(e=e),
                              h + down.format(e=e)))
    return out


def _mlp_to_hf(shards: list[dict[str, torch.Tensor]], prefix: str, gate: str, up: str,
               down: str) -> dict[str, torch.Tensor]:
    """A SwiGLU MLP's (dense or one expert's) HF gate, up and down projections from its TP shards."""
    halves = [s[prefix + "linear_fc1.weight"].chunk(2, dim=0) for s in shards]
    return {gate: _join([g for g, _ in halves], 0), up: _join([u for _, u in halves], 0),
            down: _cat(shards, prefix + "linear_fc2.weight", 1)}


def _cat(shards: list[dict[str, torch.Tensor]], name: str, dim: int) -> torch.Tensor:
    return _join([s[name] for s in shards], dim)


def _join(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    """Concatenate TP parts; a single part is returned as is (a view, no copy)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)
