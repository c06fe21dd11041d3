"""The Slurm allocation a launch runs in, and which of its hosts train and which serve rollouts."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from megatron_mgrpo.launch import LaunchError
from megatron_mgrpo.launch.planner import Layout
from megatron_mgrpo.parallel.dist import slurm_hostnames


@dataclass(frozen=True)
class SlurmJob:
    """What `mgrpo launch` reads from the batch script's environment."""

    job_id: str
    hosts: tuple[str, ...]
    gpus_per_node: int | None
    restart_count: int


def slurm_job_from_env(env: dict[str, str] | None = None) -> SlurmJob | None:
    """The allocation from SLURM_* variables, or None outside a Slurm job.

    GPUs per node come from SLURM_GPUS_ON_NODE, else SLURM_GPUS_PER_NODE (which may carry a type,
    `h100:8`); SLURM_RESTART_COUNT says how often the job was requeued (0 on the first run).
    """
    env = os.environ if env is None else env
    if "SLURM_JOB_ID" not in env:
        return None
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise LaunchError("SLURM_JOB_ID is set but SLURM_JOB_NODELIST is not: run mgrpo launch from the batch "
                          "script of an allocation")
    hosts = tuple(slurm_hostnames(nodelist))
    expected = env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES")
    if expected and int(expected) != len(hosts):
        raise LaunchError(f"SLURM_JOB_NODELIST={nodelist!r} expands to {len(hosts)} hosts but "
                          f"SLURM_JOB_NUM_NODES={expected}")
    gpus = env.get("SLURM_GPUS_ON_NODE") or env.get("SLURM_GPUS_PER_NODE")
    gpus_per_node = int(re.sub(r"^.*:", "", gpus.split("(")[0])) if gpus else None
    return SlurmJob(env["SLURM_JOB_ID"], hosts, gpus_per_node, int(env.get("SLURM_RESTART_COUNT", 0)))


@dataclass(frozen=True)
class NodeRoles:
    """Training hosts (the first is the rendezvous master) and rollout hosts, in allocation order."""

    train: tuple[str, ...]
    rollout: tuple[str, ...]

    @property
    def master(self) -> str:
        return self.train[0]


def assign_nodes(hosts: tuple[str, ...], layout: Layout) -> NodeRoles:
    """The first hosts train, the next ones serve rollouts (disaggregated); the count must match."""
    wanted = layout.train_nodes + layout.rollout_nodes
    if len(hosts) != wanted:
        raise LaunchError(f"the allocation has {len(hosts)} node(s) ({', '.join(hosts)}) but the plan needs {wanted} "
                          f"({layout.train_nodes} training + {layout.rollout_nodes} rollout): set launch.nodes or "
                          f"--nodes to {len(hosts)}, or change #SBATCH --nodes")
    return NodeRoles(hosts[:layout.train_nodes], hosts[layout.train_nodes:])


def placeholder_hosts(nodes: int) -> tuple[str, ...]:
    """Host names for a dry run outside Slurm: this machine for one node, numbered names otherwise."""
    return ("localhost",) if nodes == 1 else tuple(f"node{i}" for i in range(nodes))
