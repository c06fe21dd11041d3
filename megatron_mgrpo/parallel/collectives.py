"""Python objects across ranks: what rank 0 decided, what the last pipeline stage computed, what
every data-parallel rank holds. Each is a no-op where its group has one rank."""

from __future__ import annotations

import torch.distributed as dist


def broadcast_from_rank0(value):
    """`value` from global rank 0 on every rank (rank 0 drives the engines and the grader)."""
    if dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_from_last_stage(value):
    """`value` from the last pipeline stage of this rank's pipeline, on every stage of it."""
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=ps.get_pipeline_model_parallel_last_rank(),
                               group=ps.get_pipeline_model_parallel_group())
    return box[0]


def gather_from_data_parallel_ranks(value) -> list:
    """`value` of every data-parallel rank of this model shard, in rank order."""
    from megatron.core import parallel_state as ps

    size = ps.get_data_parallel_world_size()
    if size == 1:
        return [value]
    parts = [None] * size
    dist.all_gather_object(parts, value, group=ps.get_data_parallel_group())
    return parts
