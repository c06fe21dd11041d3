"""Process-group set-up from torchrun or Slurm variables: nccl on GPU, gloo on CPU."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_mgrpo.parallel.cpu_compat import apply_cpu_compat


@dataclass(frozen=True)
class Launch:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def launch_from_env(env: dict[str, str] | None = None) -> Launch:
    """Rank and rendezvous from torchrun's variables, else Slurm's (first host of the node list)."""
    env = os.environ if env is None else env
    if "RANK" in env:
        return Launch(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                      env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)))
    if "SLURM_PROCID" in env:
        return Launch(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                      env.get("MASTER_ADDR") or first_slurm_host(env["SLURM_JOB_NODELIST"]),
                      int(env.get("MASTER_PORT", 29500)))
    return Launch(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT", 29500)))


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list such as `gpu[003-005,010],cpu1` (no scontrol needed)."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ValueError(f"cannot read SLURM_JOB_NODELIST={nodelist!r}")
    prefix, ranges = match.groups()
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def init_distributed(tp: int = 1, pp: int = 1, seed: int = 1234, launch: Launch | None = None) -> Launch:
    """Create the process group and megatron-core's parallel groups, then seed the RNG streams."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    launch = launch or launch_from_env()
    if launch.world_size % (tp * pp):
        raise ValueError(f"world size {launch.world_size} is not divisible by parallel.tp={tp} x parallel.pp={pp}")
    on_cpu = apply_cpu_compat()
    if on_cpu:
        backend = "gloo"
    else:
        backend = "nccl"
        torch.cuda.set_device(launch.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
                                rank=launch.rank, world_size=launch.world_size)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    model_parallel_cuda_manual_seed(seed)
    return launch


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
