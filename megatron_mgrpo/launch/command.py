"""`mgrpo launch`: plan the run, print the plan and the commands, then (without --dry-run) run them."""

from __future__ import annotations

import argparse

from megatron_mgrpo.config import Config, load_config
from megatron_mgrpo.launch import LaunchError
from megatron_mgrpo.launch.model_shape import ModelShape, load_model_shape
from megatron_mgrpo.launch.planner import MemoryPlan, Plan, plan_launch
from megatron_mgrpo.launch.render import Step, render_steps
from megatron_mgrpo.launch.slurm import assign_nodes, placeholder_hosts, slurm_job_from_env


def launch(args: argparse.Namespace) -> int:
    """Exit code 2 when the plan does not fit (after printing it), else the run's exit code."""
    job = slurm_job_from_env()
    overrides = list(args.overrides) + _cluster_overrides(args, job)
    cfg = load_config(args.config, overrides)
    shape, shape_source = load_model_shape(cfg.model.path, args.model_config)
    plan = plan_launch(cfg, shape)
    restart = job.restart_count if job else 0
    problems = plan.problems()
    if problems:  # the plan and its memory tables say why, but no command that would not run
        print(describe(cfg, shape, shape_source, plan, [], restart=restart))
        raise LaunchError("; ".join(problems))
    hosts = job.hosts if job else placeholder_hosts(cfg.launch.nodes)
    roles = assign_nodes(hosts, plan.layout)
    launcher = args.launcher if args.launcher != "auto" else "srun" if job or len(hosts) > 1 else "torchrun"
    steps = render_steps(cfg, plan.layout, roles, config_path=args.config, overrides=list(args.overrides),
                         launcher=launcher, log_dir=args.log_dir)
    print(describe(cfg, shape, shape_source, plan, steps, restart=restart))
    if args.dry_run:
        return 0
    from megatron_mgrpo.launch.runner import run_steps

    return run_steps(steps, args.log_dir)


def _cluster_overrides(args: argparse.Namespace, job) -> list[str]:
    """--nodes / --gpus-per-node win; inside Slurm the allocation fills what they leave open. A given
    value always goes to the config, whose validation refuses one that is not positive."""
    nodes = args.nodes if args.nodes is not None else len(job.hosts) if job else None
    gpus = args.gpus_per_node if args.gpus_per_node is not None else job.gpus_per_node if job else None
    return [f"launch.{key}={value}" for key, value in (("nodes", nodes), ("gpus_per_node", gpus)) if value is not None]


def describe(cfg: Config, shape: ModelShape, shape_source: str, plan: Plan, steps: list[Step],
             restart: int = 0) -> str:
    """The human-readable plan: model, layout, memory tables, warnings and the commands."""
    layout, par, launch = plan.layout, cfg.parallel, cfg.launch
    kind = f"MoE, {shape.num_experts} experts top-{shape.experts_per_token}" if shape.is_moe else "dense"
    lines = [
        f"model    {cfg.model.path} ({shape_source}): {shape.total_params() / 1e9:.2f} B parameters, {kind}",
        f"cluster  {launch.nodes} node(s) x {launch.gpus_per_node} GPU(s), {launch.placement}: "
        f"{layout.train_nodes} training node(s), {layout.rollout_nodes} rollout node(s)"
        + (f"; requeued {restart} time(s), resuming from the newest checkpoint" if restart else ""),
        f"layout   tp={par.tp} pp={par.pp} cp={par.cp} ep={par.ep} -> dp={layout.dp} over {layout.train_world} GPUs; "
        f"{layout.sequences_per_update} sequences of <= {layout.seq_len} tokens per optimizer step, "
        f"{layout.micro_batches_per_rank} micro-batch(es) per rank",
    ]
    if cfg.rollout.engine != "hf":
        lines.append(f"rollout  {cfg.rollout.engine}: {launch.policy_engines} policy + {launch.momentum_engines} "
                     f"momentum engine(s) x {launch.rollout_tp} GPU(s); each KV cache holds {plan.kv_sequences} "
                     f"full-length sequences")
    for memory in (plan.train_memory, plan.rollout_memory):
        if memory:
            lines += ["", *_memory_table(memory)]
    lines += [""] + [f"warning: {w}" for w in plan.warnings]
    if steps:
        lines += ["commands:"] + [f"  {s.shell()}" for s in steps]
    else:
        lines.append("commands: none, the plan does not fit")
    return "\n".join(lines)


def _memory_table(memory: MemoryPlan) -> list[str]:
    rows = [f"memory per {memory.device} ({memory.budget_gib:.1f} GiB)"]
    rows += [f"  {item.name:<68} {item.gib:7.1f} GiB" for item in memory.items]
    free = memory.budget_gib - memory.total_gib
    verdict = f"fits, {free:.1f} GiB free" if free >= 0 else f"DOES NOT FIT by {-free:.1f} GiB"
    rows.append(f"  {'total':<68} {memory.total_gib:7.1f} GiB  {verdict}")
    return rows
