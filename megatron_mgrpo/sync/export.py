"""Local Megatron shards -> full HF-named tensors, streamed layer by layer.

One generator serves every consumer of weights: pushes to rollout engines, the HF exporter, and
the momentum model (pass the EMA tensors instead of the parameters: they share the layout).
Tensor-parallel shards are gathered inside the TP group one layer at a time, so the memory
beyond the local shards is one layer; TP rank 0 of each pipeline stage yields that stage's
tensors and the other ranks only take part in the gathers, since an engine needs every tensor
once, not once per rank.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
import torch.distributed as dist

from megatron_mgrpo.models.hf_config import ModelSpec
from megatron_mgrpo.models.weight_map import edge_to_hf, layer_to_hf, stage_layers


def _tp_sharded(name: str) -> bool:
    return "layernorm" not in name  # norms are replicated; every other weight is split over TP


def export_hf_weights(local: Mapping[str, torch.Tensor], spec: ModelSpec) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (hf_name, full tensor) from this rank's Megatron tensors (e.g. `model.state_dict()`)."""
    from megatron.core import parallel_state as ps

    tp_size, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    pp_size, pp_rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    group = ps.get_tensor_model_parallel_group()
    tensors = {n: t.detach() for n, t in local.items() if not n.endswith("_extra_state")}

    def gathered(names: list[str], prefix: str = "") -> list[dict[str, torch.Tensor]]:
        """Per TP rank, the named tensors (relative to `prefix`); replicated ones from this rank."""
        shards = [{} for _ in range(tp_size)]
        for name in names:
            tensor = tensors[name]
            if tp_size > 1 and _tp_sharded(name):
                parts = [torch.empty_like(tensor) for _ in range(tp_size)]
                dist.all_gather(parts, tensor.contiguous(), group=group)
            else:
                parts = [tensor] * tp_size
            for shard, part in zip(shards, parts):
                shard[name[len(prefix):]] = part
        return shards

    edges = [n for n in tensors if not n.startswith("decoder.layers.")]
    for local_index, layer in enumerate(stage_layers(spec, pp_rank, pp_size)):
        prefix = f"decoder.layers.{local_index}."
        shards = gathered(sorted(n for n in tensors if n.startswith(prefix)), prefix)
        if tp_rank == 0:
            yield from layer_to_hf(shards, spec, layer).items()
    shards = gathered(sorted(edges))
    if tp_rank == 0:
        yield from edge_to_hf(shards, spec).items()
