"""The command lines a launch runs: rollout servers, then the trainer, under srun or torchrun.

Every process of the job is started from these argv lists, so a dry run prints exactly what a
real launch executes. Under Slurm each piece is its own `srun --overlap` step pinned to its hosts:
servers take their GPUs with CUDA_VISIBLE_DEVICES, and the trainer runs one task per GPU (ranks
from SLURM_PROCID, see parallel/dist.py), so srun forwards a preemption signal straight to every
trainer rank without a torchrun agent in between. With launch.container_image set, every step
runs inside that image through the pyxis srun flags, so the batch node only needs the planner.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from megatron_mgrpo.config import Config
from megatron_mgrpo.launch import LaunchError
from megatron_mgrpo.launch.planner import Layout
from megatron_mgrpo.launch.slurm import NodeRoles
from megatron_mgrpo.rollout import vllm_engine
from megatron_mgrpo.rollout.pools import URLS_ENV


@dataclass(frozen=True)
class Engine:
    pool: str
    index: int
    host: str
    gpus: tuple[int, ...]
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass(frozen=True)
class Step:
    """One process group to start: a rollout server (with the engine it serves) or the trainer."""

    name: str
    argv: tuple[str, ...]
    engine: Engine | None = None

    def shell(self) -> str:
        return shlex.join(self.argv)


def place_engines(cfg: Config, roles: NodeRoles) -> list[Engine]:
    """Policy engines first, then momentum engines, filling each host's GPUs in order."""
    launch = cfg.launch
    hosts = roles.rollout or roles.train
    slots = [(host, tuple(range(first, first + launch.rollout_tp)))
             for host in hosts for first in range(0, launch.gpus_per_node, launch.rollout_tp)]
    pools = ["policy"] * launch.policy_engines + ["momentum"] * launch.momentum_engines
    engines, per_host = [], {}
    for number, (pool, (host, gpus)) in enumerate(zip(pools, slots)):
        port = launch.engine_port + per_host.get(host, 0)
        per_host[host] = per_host.get(host, 0) + 1
        index = number if pool == "policy" else number - launch.policy_engines
        engines.append(Engine(pool, index, host, gpus, port))
    return engines


def server_argv(cfg: Config, engine: Engine, layout: Layout) -> list[str]:
    """The SGLang or vLLM server command of one engine, sized by the plan."""
    launch, model = cfg.launch, cfg.model.path
    if cfg.rollout.engine == "sglang":
        return [launch.engine_python, "-m", "sglang.launch_server", "--model-path", model, "--host", "0.0.0.0",
                "--port", str(engine.port), "--tp-size", str(launch.rollout_tp),
                "--mem-fraction-static", str(launch.rollout_mem_fraction),
                "--context-length", str(layout.seq_len), "--dtype", "bfloat16"]
    return [*(f"{k}={v}" for k, v in vllm_engine.SERVER_ENV.items()),
            launch.engine_python, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
            "--served-model-name", engine.pool, "--host", "0.0.0.0",
            "--port", str(engine.port), "--tensor-parallel-size", str(launch.rollout_tp),
            "--gpu-memory-utilization", str(launch.rollout_mem_fraction),
            "--max-model-len", str(layout.seq_len), "--dtype", "bfloat16",
            "--logprobs-mode", "processed_logprobs", "--worker-extension-cls", vllm_engine.WORKER_EXTENSION]


def trainer_argv(config_path: str, overrides: list[str]) -> list[str]:
    return ["python3", "-m", "megatron_mgrpo.cli", "train", "--config", config_path, *overrides]


def render_steps(cfg: Config, layout: Layout, roles: NodeRoles, *, config_path: str, overrides: list[str],
                 launcher: str, log_dir: str) -> list[Step]:
    """Server steps (one per engine), then the trainer step(s): what `mgrpo launch` runs, in order."""
    engines = place_engines(cfg, roles) if cfg.rollout.engine != "hf" else []
    container = _container_flags(cfg)
    if container and launcher != "srun":
        raise LaunchError(f"launch.container_image={cfg.launch.container_image!r} runs each step through srun's "
                          f"pyxis flags, which --launcher {launcher} does not use: use --launcher srun")
    steps = []
    for engine in engines:
        name = f"{engine.pool}-engine-{engine.index}"
        env = ["env", f"CUDA_VISIBLE_DEVICES={','.join(map(str, engine.gpus))}"]
        argv = server_argv(cfg, engine, layout)
        if launcher == "srun":
            argv = _srun(name, [engine.host], 1, log_dir) + container + env + argv
        else:
            argv = env + argv
        steps.append(Step(name, tuple(argv), engine))
    urls = ["env"] + [f"{var}={','.join(e.url for e in engines if e.pool == pool)}"
                      for pool, var in URLS_ENV.items() if any(e.pool == pool for e in engines)]
    train = trainer_argv(config_path, overrides)
    port = str(cfg.launch.master_port)
    if launcher == "srun":
        argv = _srun("train", list(roles.train), cfg.launch.gpus_per_node, log_dir) + container + urls + [
            f"MASTER_ADDR={roles.master}", f"MASTER_PORT={port}"] + train
        return steps + [Step("train", tuple(argv))]
    if len(roles.train) + len(roles.rollout) > 1:
        raise LaunchError(f"--launcher torchrun starts processes on this machine only, but the plan spans "
                          f"{len(roles.train) + len(roles.rollout)} nodes: use --launcher srun inside a Slurm job")
    torchrun = ["torchrun", "--nnodes=1", f"--nproc-per-node={cfg.launch.gpus_per_node}",
                f"--master-addr={roles.master}", f"--master-port={port}", "-m", *train[2:]]
    return steps + [Step("train", tuple((urls if len(urls) > 1 else []) + torchrun))]


def _srun(name: str, hosts: list[str], tasks_per_node: int, log_dir: str) -> list[str]:
    """An srun step on exactly `hosts`; --overlap lets servers and trainer share whole-node allocations.

    No GPU or CPU binding: trainer ranks pick their GPU from SLURM_LOCALID and servers get theirs
    through CUDA_VISIBLE_DEVICES, and a rank pinned to one core would starve its data loading.
    """
    return ["srun", "--overlap", f"--job-name={name}", f"--nodes={len(hosts)}", f"--nodelist={','.join(hosts)}",
            f"--ntasks-per-node={tasks_per_node}", "--gpu-bind=none", "--cpu-bind=none", "--kill-on-bad-exit=1",
            f"--output={log_dir}/{name}-%j.log"]


def _container_flags(cfg: Config) -> list[str]:
    """pyxis flags that put a step inside launch.container_image; none without an image.

    Mounts or a workdir without an image would be silently dropped, so they are refused instead.
    """
    launch = cfg.launch
    if not launch.container_image:
        stray = [key for key in ("container_mounts", "container_workdir") if getattr(launch, key)]
        if stray:
            raise LaunchError(f"launch.{stray[0]} is set but launch.container_image is empty: set the image, "
                              f"or drop launch.{stray[0]}")
        return []
    flags = [f"--container-image={launch.container_image}"]
    if launch.container_mounts:
        flags.append(f"--container-mounts={launch.container_mounts}")
    if launch.container_workdir:
        flags.append(f"--container-workdir={launch.container_workdir}")
    return flags
