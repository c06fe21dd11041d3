"""The run around the step: set-up checked before expensive work, the warm start, resume, the
step loop with evaluation, checkpoints and preemption, and the HF export and summary at the end."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_mgrpo.config import Config, to_yaml
from megatron_mgrpo.parallel.collectives import broadcast_from_rank0
from megatron_mgrpo.preflight import check_layout, check_lengths

#: the config `mgrpo train` runs without --config: the embedded CPU default
EMBEDDED_PRESET = str(Path(__file__).parent / "presets" / "tiny_cpu.yaml")


def train(cfg: Config, run_dir: Path, console=None) -> dict:
    """Run M-GRPO (or a baseline) as `cfg` says, into `run_dir`; resumes from its newest complete
    checkpoint. Returns the summary (on every rank)."""
    from megatron_mgrpo import metrics as metrics_lib
    from megatron_mgrpo.collapse_alarm import collapse_alarm
    from megatron_mgrpo.data.splits import build_splits
    from megatron_mgrpo.models.builtin import default_cache_dir, resolve_model_path
    from megatron_mgrpo.parallel.dist import destroy_distributed, init_distributed
    from megatron_mgrpo.plots import plot_metrics
    from megatron_mgrpo.train.checkpoint import load_latest_checkpoint, save_checkpoint
    from megatron_mgrpo.trainer import Trainer
    from megatron_mgrpo.warmstart import warm_start

    started = time.perf_counter()
    # every rank resolves the model before the process group exists (a builtin one is published
    # atomically, so concurrent writers are safe), to check the layout against it first
    model_dir = resolve_model_path(cfg.model.path)
    check_layout(cfg, model_dir)
    p = cfg.parallel
    init_distributed(tp=p.tp, pp=p.pp, ep=p.ep, cp=p.cp, seed=cfg.train.seed)
    rank0 = dist.get_rank() == 0
    say = (console.print if console else print) if rank0 else (lambda *a, **k: None)
    trainer = sink = None
    try:
        splits = build_splits(cfg)  # before any expensive work: bad or overlapping data stops here
        check_lengths(cfg, model_dir, splits.rl, splits.eval)
        split_report = splits.report()
        run_dir.mkdir(parents=True, exist_ok=True)
        if rank0:
            (run_dir / "config.yaml").write_text(to_yaml(cfg))
            (run_dir / "splits.json").write_text(json.dumps(split_report, indent=2) + "\n")
            say("data: " + ", ".join(f"{name} {size} ({split_report['sources'][name]})"
                                     for name, size in split_report["sizes"].items() if size))
        if cfg.warmstart.steps:
            model_dir = warm_start(cfg, model_dir, default_cache_dir(), splits.warmstart, progress=say)
        trainer = Trainer(cfg, run_dir, model_dir, splits.rl, splits.eval)
        policy, start, state = trainer.policy, 0, {}
        loaded = load_latest_checkpoint(run_dir, [policy.model], optimizer=policy.optimizer,
                                        scheduler=policy.scheduler, momentum=policy.momentum.state_dict(),
                                        say=say) if cfg.checkpoint.resume else None
        if loaded is not None:
            start, state = loaded.step, loaded.common
            say(f"resumed from {loaded.path} (step {start})")
        earlier_seconds = state.get("wall_seconds", 0.0)  # of the processes before this one, up to the checkpoint
        # every pool gets the weights we start from (also servers a launcher started from model.path)
        trainer.sync_weights(start, every_pool=True)
        state["momentum_shard_mib"] = round(policy.momentum.nbytes / 2**20, 2)  # rank 0's fp32 EMA shards
        if rank0:
            sink = metrics_lib.MetricsSink(run_dir, cfg.train.steps, start_step=start, wandb_mode=cfg.log.wandb,
                                           wandb_project=cfg.log.wandb_project, config=dataclasses.asdict(cfg),
                                           console=console, tensorboard=cfg.log.tensorboard)
            if start == 0 and trainer.eval_prompts:
                state["initial_true_accuracy"] = trainer.true_accuracy()
            sink.timer.take()  # set-up time is not step 0's
        trainer.start_rollout(start)
        preempted = _PreemptionRequest()
        for step in range(start, cfg.train.steps):
            phase = sink.phase if rank0 else (lambda name: contextlib.nullcontext())
            record = trainer.step(step, phase)
            stopping = preempted.agreed()
            last = step == cfg.train.steps - 1 or stopping
            if rank0:
                if (step + 1) % cfg.eval.interval == 0 or last:
                    with phase("eval"):
                        record["accuracy/true"] = trainer.true_accuracy()
                        if trainer.n:
                            record["accuracy/true_momentum"] = trainer.true_accuracy("momentum")
                alarm = collapse_alarm([*sink.history, record])
                record["alarm/collapse"] = float(alarm.alarm)
                sink.log(step, record, tokens=record["generated_tokens"])
            if (step + 1) % cfg.checkpoint.interval == 0 or last:
                state["wall_seconds"] = earlier_seconds + time.perf_counter() - started
                state = broadcast_from_rank0(state)
                save_checkpoint(run_dir, step + 1, [policy.model], optimizer=policy.optimizer,
                                scheduler=policy.scheduler, momentum=policy.momentum.state_dict(), common=state,
                                keep_last=cfg.checkpoint.keep_last, files_from=model_dir)
            if stopping:
                say(f"preempted: checkpoint of step {step + 1} saved; the same command resumes from it")
                return {}
        export_hf(trainer, run_dir / "hf")
        summary = {}
        if rank0:
            history = sink.history
            sink.close()
            sink = None
            summary = summarize(cfg, run_dir, state, history, earlier_seconds + time.perf_counter() - started,
                                split_report)
            plot_metrics(run_dir)
            metrics_lib.print_summary(summary, console)
        return broadcast_from_rank0(summary)
    finally:
        if sink is not None:
            sink.close()
        if trainer is not None:
            trainer.close()
        destroy_distributed()


class _PreemptionRequest:
    """SIGUSR1 (Slurm's warning before preemption or the time limit) asks for a checkpoint at the
    end of the current step and a clean exit; the ranks agree on it, so they stop together."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGUSR1, self._request)

    def _request(self, signum, frame) -> None:
        self.requested = True

    def agreed(self) -> bool:
        flag = torch.tensor([float(self.requested)])
        if dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def export_hf(trainer, out: Path) -> None:
    """The policy and the momentum model as loadable HF directories (`out/policy`, `out/momentum`)."""
    from megatron_mgrpo.models.loading import load_hf_model
    from megatron_mgrpo.models.weight_map import load_checkpoint_tensors

    for which in ("policy", "momentum"):
        weights = dict(trainer.policy.hf_weights(which))
        if dist.get_rank() == 0:
            model = load_hf_model(trainer.model_dir)
            load_checkpoint_tensors(model, weights)
            model.save_pretrained(out / which)
            trainer.tokenizer.save_pretrained(out / which)


def summarize(cfg: Config, run_dir: Path, state: dict, history: list[dict], wall_seconds: float,
              splits: dict) -> dict:
    accuracies = [r["accuracy/true"] for r in history if r.get("accuracy/true") is not None]
    momentum = [r["accuracy/true_momentum"] for r in history if r.get("accuracy/true_momentum") is not None]
    alarmed = [r["step"] for r in history if r.get("alarm/collapse")]
    summary = {"label_source": cfg.reward.label_source, "steps": len(history),
               "initial_true_accuracy": state.get("initial_true_accuracy"),
               "final_true_accuracy": accuracies[-1] if accuracies else None,
               "best_true_accuracy": max(accuracies) if accuracies else None,
               "final_momentum_true_accuracy": momentum[-1] if momentum else None,
               "final_reward": history[-1].get("reward/mean") if history else None,
               "collapse_alarm": bool(alarmed), "collapse_alarm_first_step": alarmed[0] if alarmed else None,
               "momentum_shard_mib": state.get("momentum_shard_mib"),
               "wall_seconds": round(wall_seconds, 1), "splits": splits}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
