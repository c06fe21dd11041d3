"""Process-group set-up from torchrun or Slurm variables: nccl on GPU, gloo on CPU."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_mgrpo.parallel.cpu_compat import apply_cpu_compat
from megatron_mgrpo.parallel.ports import free_port
from megatron_mgrpo.parallel.threads import confine_intra_op_threads

BACKENDS = ("auto", "nccl", "gloo")


@dataclass(frozen=True)
class Launch:
    """Where this process sits in the job and where the rendezvous is."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def launch_from_env(env: dict[str, str] | None = None) -> Launch:
    """Rank and rendezvous from torchrun's variables, else Slurm's, else a single local process.

    Under Slurm (srun, one task per GPU) the master is the first host of SLURM_JOB_NODELIST,
    expanded here rather than with `scontrol show hostnames`, which is not on every compute
    image; MASTER_ADDR / MASTER_PORT still win when the batch script exports them.
    """
    env = os.environ if env is None else env
    port = int(env.get("MASTER_PORT", 29500))
    if "RANK" in env:
        return Launch(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                      env.get("MASTER_ADDR", "127.0.0.1"), port)
    if "SLURM_PROCID" in env:
        return Launch(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                      env.get("MASTER_ADDR") or first_slurm_host(env["SLURM_JOB_NODELIST"]), port)
    # a lone process rendezvouses with itself: any free port, so that several runs can share a machine
    return Launch(0, 1, 0, "127.0.0.1", port if "MASTER_PORT" in env else free_port())


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list such as `gpu[003-005,010],cpu1` (zero padding kept)."""
    return slurm_hostnames(nodelist)[0]


def slurm_hostnames(nodelist: str) -> list[str]:
    """Every host of a Slurm node list, in order: `gpu-[001-002,010],cpu1` -> gpu-001, gpu-002, gpu-010, cpu1.

    Ranges keep the zero padding of their first bound, as Slurm writes them; a name may hold several
    bracket groups (`r[1-2]n[1-2]`), expanded left to right.
    """
    hosts = []
    for item in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", nodelist.strip()):
        hosts += _expand_host(item)
    if not hosts:
        raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r} is not a Slurm node list (expected e.g. 'gpu[01-04]')")
    return hosts


def _expand_host(item: str) -> list[str]:
    match = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", item)
    if not match:
        return [item]
    prefix, ranges, rest = match.groups()
    numbers = []
    for part in ranges.split(","):
        low, _, high = part.partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise ValueError(f"node range {part!r} in {item!r} is not a number or a low-high range")
        numbers += [str(n).zfill(len(low)) for n in range(int(low), int(high or low) + 1)]
    return [prefix + number + tail for number in numbers for tail in _expand_host(rest)]


def data_parallel_size(world_size: int, *, tp: int = 1, pp: int = 1, ep: int = 1, cp: int = 1) -> int:
    """The data-parallel size of a layout, or a ValueError that names the sizes to change.

    megatron-core needs tp * pp * cp to divide the world (dense layers) and tp * ep * pp too
    (expert layers, with expert TP = TP); checking here fails before any process group exists.
    """
    for name, size in (("parallel.tp", tp), ("parallel.pp", pp), ("parallel.ep", ep), ("parallel.cp", cp)):
        if size < 1:
            raise ValueError(f"{name}={size} must be >= 1")
    if world_size % (tp * pp * cp):
        raise ValueError(f"world size {world_size} is not divisible by parallel.tp={tp} x parallel.pp={pp} x "
                         f"parallel.cp={cp} = {tp * pp * cp}: change the sizes or the number of processes")
    if world_size % (tp * ep * pp):
        raise ValueError(f"world size {world_size} is not divisible by parallel.tp={tp} x parallel.ep={ep} x "
                         f"parallel.pp={pp} = {tp * ep * pp}: change the sizes or the number of processes")
    return world_size // (tp * pp * cp)


def init_distributed(tp: int = 1, pp: int = 1, ep: int = 1, cp: int = 1, *, backend: str = "auto",
                     seed: int = 1234, launch: Launch | None = None) -> Launch:
    """Create the process group and megatron-core's parallel groups, then seed every RNG stream.

    `backend="auto"` is nccl with CUDA and gloo without (after the CPU adaptation of
    megatron-core). Seeds follow megatron's convention: torch's default generator gets
    `seed + 100 * pp_rank`, so the layers of different stages differ while the TP ranks of a stage
    (which slice one CPU-initialised master weight) agree; megatron's tracker adds the per-TP streams.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend='nccl' needs CUDA, which is not available here: use backend='gloo' or 'auto'")
    launch = launch or launch_from_env()
    data_parallel_size(launch.world_size, tp=tp, pp=pp, ep=ep, cp=cp)
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if apply_cpu_compat():
        backend = "gloo" if backend == "auto" else backend
    else:
        backend = "nccl" if backend == "auto" else backend
        torch.cuda.set_device(launch.local_rank)
    if backend == "gloo":  # before gloo's worker threads first run intra-op work (see parallel/threads)
        confine_intra_op_threads()
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
                                rank=launch.rank, world_size=launch.world_size)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                             expert_model_parallel_size=ep, context_parallel_size=cp)
    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    torch.manual_seed(stage_seed)
    model_parallel_cuda_manual_seed(stage_seed)
    return launch


def destroy_distributed() -> None:
    """Tear down megatron's groups and the process group (a job that skips this can abort at exit)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
