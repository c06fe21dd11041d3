"""Local Megatron shards -> full HF-named tensors, streamed layer by layer.

One generator serves every consumer of weights: pushes to rollout engines, the HF exporter, and
the momentum model (pass the EMA tensors instead of the parameters: they share the layout).
Shards are gathered one layer at a time, so the memory beyond the local shards is one layer:
MoE experts first over the expert-parallel group (one flat all-gather per layer, after which
every EP rank holds all experts under their global indices), then tensor-parallel shards inside
the TP group (experts inside the expert-TP group).

Who yields: the rank with TP rank 0 and expert-parallel rank 0 of each pipeline stage yields that
stage's tensors; the other ranks only take part in the gathers, since an engine needs every
tensor once, not once per rank. With `collect_stages=True` that rank of the first stage yields
every stage's tensors (the later stages send theirs to it over the pipeline group, layer by
layer), for consumers that take all weights in one process. Data-parallel replicas yield copies:
push from one of them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
import torch.distributed as dist

from megatron_mgrpo.models.hf_config import ModelSpec
from megatron_mgrpo.models.weight_map import edge_to_hf, layer_to_hf, merge_expert_shards, stage_layers

_EXPERT = "mlp.experts."


def _tp_sharded(name: str) -> bool:
    """Norms and the MoE router are replicated over TP; every other weight is split."""
    return "layernorm" not in name and "mlp.router." not in name


def export_hf_weights(local: Mapping[str, torch.Tensor], spec: ModelSpec, *,
                      collect_stages: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (hf_name, full tensor) from this rank's Megatron tensors (e.g. `model.state_dict()`)."""
    from megatron.core import parallel_state as ps

    yields = ps.get_tensor_model_parallel_rank() == 0 and ps.get_expert_model_parallel_rank() == 0
    pp_size, pp_rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    tensors = {n: t.detach() for n, t in local.items() if not n.endswith("_extra_state")}
    groups = _stage_groups(tensors, spec, yields)
    if not collect_stages or pp_size == 1:
        for group in groups:
            yield from group.items()
        return
    pipeline = ps.get_pipeline_model_parallel_group()
    if pp_rank > 0:
        for group in groups:
            _send(group, pipeline)
        if yields:
            _send(None, pipeline)
        return
    for group in groups:
        yield from group.items()
    if yields:
        device = next(iter(tensors.values())).device
        for stage in range(1, pp_size):
            yield from _receive(stage, pipeline, device)


def _stage_groups(tensors: dict[str, torch.Tensor], spec: ModelSpec, yields: bool) -> Iterator[dict[str, torch.Tensor]]:
    """This stage's HF tensors, one dict per layer and one for the edges, on the yielding rank;
    every rank of the stage runs the gathers in the same order."""
    from megatron.core import parallel_state as ps

    pp_size, pp_rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    for local_index, layer in enumerate(stage_layers(spec, pp_rank, pp_size)):
        prefix = f"decoder.layers.{local_index}."
        named = {n[len(prefix):]: t for n, t in tensors.items() if n.startswith(prefix)}
        shards = _tp_gathered(_ep_gathered(named, spec))
        if yields:
            yield layer_to_hf(shards, spec, layer)
    shards = _tp_gathered({n: t for n, t in tensors.items() if not n.startswith("decoder.layers.")})
    if yields:
        yield edge_to_hf(shards, spec)


def _ep_gathered(named: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """`named` with this layer's local experts replaced by all experts under global indices."""
    from megatron.core import parallel_state as ps

    ep_size = ps.get_expert_model_parallel_world_size()
    names = sorted(n for n in named if n.startswith(_EXPERT))
    if ep_size == 1 or not names:
        return named
    flat = torch.cat([named[n].reshape(-1) for n in names])
    parts = _all_gather(flat, ps.get_expert_model_parallel_group(), ep_size)
    sizes = [named[n].numel() for n in names]
    ep_shards = [{n: chunk.view(named[n].shape).to(named[n].dtype) for n, chunk in zip(names, part.split(sizes))}
                 for part in parts]
    return {**{n: t for n, t in named.items() if not n.startswith(_EXPERT)}, **merge_expert_shards(ep_shards, spec)}


def _tp_gathered(named: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Per TP rank, the named tensors; replicated ones are this rank's. Experts are gathered in
    the expert-TP group (the same size as TP: expert TP is not set separately)."""
    from megatron.core import parallel_state as ps

    tp_size = ps.get_tensor_model_parallel_world_size()
    shards = [{} for _ in range(tp_size)]
    for name in sorted(named):
        tensor = named[name]
        if tp_size > 1 and _tp_sharded(name):
            group = (ps.get_expert_tensor_parallel_group() if name.startswith(_EXPERT)
                     else ps.get_tensor_model_parallel_group())
            parts = _all_gather(tensor, group, tp_size)
        else:
            parts = [tensor] * tp_size
        for shard, part in zip(shards, parts):
            shard[name] = part
    return shards


def _all_gather(tensor: torch.Tensor, group, size: int) -> list[torch.Tensor]:
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return parts


def _send(group: dict[str, torch.Tensor] | None, pipeline) -> None:
    """Send one group of HF tensors (None: the end of this stage) to the first pipeline stage."""
    header = None if group is None else [(n, t.shape, t.dtype) for n, t in group.items()]
    dist.send_object_list([header], group_dst=0, group=pipeline)
    for tensor in (group or {}).values():
        dist.send(tensor.contiguous(), group_dst=0, group=pipeline)


def _receive(stage: int, pipeline, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """The HF tensors pipeline stage `stage` sends with `_send`, in its order."""
    while True:
        header = [None]
        dist.recv_object_list(header, group_src=stage, group=pipeline)
        if header[0] is None:
            return
        for name, shape, dtype in header[0]:
            tensor = torch.empty(shape, dtype=dtype, device=device)
            dist.recv(tensor, group_src=stage, group=pipeline)
            yield name, tensor
