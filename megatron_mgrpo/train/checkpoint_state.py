"""The sharded state a checkpoint holds: each model chunk's tensors, the momentum copy sharded
like its parameters (`momentum.<parameter key>`, so it reshards exactly like the weights), the
optimizer state in megatron's fully reshardable layout, and every rank's RNG states."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

MOMENTUM_PREFIX = "momentum."
#: The distributed optimizer's state stored per parameter in the canonical (unsharded) layout, so
#: it reshards over TP / PP / DP; megatron-core 0.16.1 rejects its old default (flattened ranges).
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def materialise_optimizer_state(optimizer) -> None:
    """Give a fresh megatron optimizer the state entries that a load fills in.

    Without apex / Transformer Engine, megatron's optimizers wrap torch's Adam, whose per-parameter
    state (its `step` included) only exists after a first step, and megatron-core 0.16.1's
    `state_dict()` asserts on it; so a fresh optimizer takes one step with zero gradients at a
    zero learning rate, which leaves every parameter unchanged (the load replaces the state).
    """
    inner_optimizers = [chained.optimizer for chained in getattr(optimizer, "chained_optimizers", [optimizer])]
    for inner in inner_optimizers:
        if inner is None or inner.state:
            continue
        rates = [group["lr"] for group in inner.param_groups]
        for group in inner.param_groups:
            group["lr"] = 0.0
            for param in group["params"]:
                param.grad = torch.zeros_like(param)
        inner.step()
        inner.zero_grad(set_to_none=True)
        for group, rate in zip(inner.param_groups, rates):
            group["lr"] = rate


def unshare_adam_steps(optimizer) -> None:
    """Give every parameter's Adam state its own `step` tensor after a load.

    Without apex / Transformer Engine, megatron-core 0.16.1 restores torch Adam's per-parameter
    `step` as ONE tensor shared by all parameters; torch increments it in place once per
    parameter, so after the first resumed step it counts steps x parameters and the bias
    correction is wrong (a resumed run drifts from an uninterrupted one)."""
    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(chained, "optimizer", None)
        for state in inner.state.values() if inner is not None else ():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()


def copy_into(targets: Mapping[str, torch.Tensor], loaded: Mapping[str, torch.Tensor]) -> None:
    """Copy loaded tensors into the caller's (factories such as the fused SwiGLU weight return new
    tensors on load instead of filling the given ones)."""
    with torch.no_grad():
        for name, target in targets.items():
            if loaded[name] is not target:
                target.copy_(loaded[name])


def as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def unwrapped(model_chunks) -> list:
    """The models inside DDP / Float16Module wrappers: a wrapper would prefix every key with
    `module.`, and a checkpoint must not depend on how the model was wrapped."""
    from megatron.core.utils import unwrap_model

    return unwrap_model(as_list(model_chunks))


def chunk_key(index: int, count: int) -> str:
    return "model" if count == 1 else f"model{index}"


def layout(num_chunks: int) -> dict[str, int]:
    from megatron.core import parallel_state as ps

    return {"world_size": dist.get_world_size(), "tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(), "ep": ps.get_expert_model_parallel_world_size(),
            "chunks": num_chunks}


def model_state(chunks: list, momentum: list[Mapping[str, torch.Tensor]] | None) -> dict[str, Any]:
    """The sharded state of every chunk and, if given, of its momentum tensors."""
    if momentum is not None and len(momentum) != len(chunks):
        raise ValueError(f"momentum has {len(momentum)} mappings for {len(chunks)} model chunks: give one per chunk")
    state = {}
    for index, chunk in enumerate(chunks):
        key = chunk_key(index, len(chunks))
        state[key] = chunk.sharded_state_dict()
        if momentum is not None:
            state[f"momentum_{key}"] = momentum_sharded_tensors(state[key], momentum[index])
    return state


def only_models(state: dict[str, Any]) -> dict[str, Any]:
    """The model part that a megatron optimizer maps its parameters against."""
    return {key: value for key, value in state.items() if key.startswith("model")}


def momentum_sharded_tensors(model_sharded: Mapping[str, Any], momentum: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The momentum copy with each parameter's sharding (ShardedTensor or, for the fused SwiGLU
    weight, ShardedTensorFactory) under a prefixed key.

    The names must be exactly the model's parameter names that appear in its sharded state dict,
    with the parameters' shapes: a missing or extra name is an error, since a partial EMA would
    silently restart from zero.
    """
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    params = {name: value for name, value in model_sharded.items()
              if isinstance(value, (ShardedTensor, ShardedTensorFactory))}
    missing, unexpected = sorted(params.keys() - momentum.keys()), sorted(momentum.keys() - params.keys())
    if missing or unexpected:
        raise ValueError(f"momentum tensors do not match the model's parameters: missing {missing}, "
                         f"not parameters {unexpected}")
    out = {}
    for name, sharded in params.items():
        tensor = momentum[name]
        shape = sharded.data.shape if isinstance(sharded, ShardedTensorFactory) else sharded.local_shape
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"momentum[{name!r}] has shape {tuple(tensor.shape)}, its parameter {tuple(shape)}")
        extra = {} if isinstance(sharded, ShardedTensorFactory) else {"dtype": tensor.dtype}
        out[name] = dataclasses.replace(sharded, key=MOMENTUM_PREFIX + sharded.key, data=tensor, **extra)
    return out


def rng_sharded_object():
    """This rank's RNG states (python, numpy, torch, megatron's model-parallel streams, CUDA)."""
    from megatron.core.dist_checkpointing import ShardedObject
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
              "tracker": get_cuda_rng_tracker().get_states(),
              "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    rank, world = dist.get_rank(), dist.get_world_size()
    return ShardedObject("rng_state", states, (world,), (rank,), replica_id=0)


def set_rng_state(states: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    get_cuda_rng_tracker().set_states(states["tracker"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
