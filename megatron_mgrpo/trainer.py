"""The M-GRPO trainer: one step, top to bottom, and the run around it.

    sample M from the policy pool and N from the momentum pool
    -> trainer log-probs and entropies of all G responses (Megatron, vocab-parallel; MoE routing
       replayed from the engines when train.routing_replay is on; Intuitor's self-certainty),
       where something needs them before the loss: the IQR filter, Intuitor, several updates
       per rollout (otherwise the one on-policy update's forward provides them)
    -> extract answers, vote, rewards (the label source)
    -> anchor diagnostics (monitoring only): KL(policy || momentum), weight distances, vote flips
    -> IQR filter over the G trajectory entropies, advantages over the kept policy responses
    -> PPO-clip / TIS / KL loss, optimizer step -> EMA update of the momentum shards
    -> weight sync to the engines -> metrics -> checkpoint

Rank 0 drives the rollout engines and the grader and broadcasts the step's samples, then its
rewards; every rank runs the Megatron part (TP / PP / DP) on identical inputs. Baselines are the
same step with another `reward.label_source` (`srt`, `ttrl`, `gt`, `intuitor`) and the
ablation switches `rollout.momentum_samples` / `algo.iqr_filter`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

import torch
import torch.distributed as dist

from megatron_mgrpo.algo import (aggregate, aggregation_units, group_advantages, iqr_keep_mask, kl_penalty,
                                 policy_loss)
from megatron_mgrpo.config import Config, to_yaml
from megatron_mgrpo.data.records import PromptRecord
from megatron_mgrpo.reward.extract import extract_answer
from megatron_mgrpo.reward.labels import PromptGroup, make_label_source, pseudo_label_accuracy
from megatron_mgrpo.reward.voting import vote
from megatron_mgrpo.rollout.types import Sample, SamplingParams
from megatron_mgrpo.train.batching import MicroBatch, TrainSequences


#: the config `mgrpo train` runs without --config: the embedded CPU default
EMBEDDED_PRESET = str(Path(__file__).parent / "presets" / "tiny_cpu.yaml")


@dataclasses.dataclass
class Rewards:
    """One step's rewards, identical on every rank."""

    rewards: torch.Tensor  # [P, M]
    trainable: torch.Tensor  # [P, M] bool: the response has a reward (its prompt got a label; ttrl: a subset)
    correct: torch.Tensor  # [P, M] 1 / 0: the answer equals gold, NaN without gold (monitoring only)
    metrics: dict[str, float]
    generated_tokens: int


class Trainer:
    """Owns the policy (Megatron), the engines and grader (rank 0), and the step."""

    def __init__(self, cfg: Config, run_dir: Path, model_dir: Path, prompts: list[PromptRecord],
                 eval_prompts: list[PromptRecord]):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from megatron_mgrpo.data.templates import PromptTemplate
        from megatron_mgrpo.models.hf_config import model_spec_from_hf
        from megatron_mgrpo.train.policy import MegatronPolicy

        self.cfg, self.run_dir, self.model_dir = cfg, run_dir, model_dir
        self.m, self.n = cfg.samples_per_prompt()
        self.rank0 = dist.get_rank() == 0
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.spec = model_spec_from_hf(hf_model.config, tp=cfg.parallel.tp)
        self.policy = MegatronPolicy(self.spec, hf_model.state_dict(), cfg, momentum=True,
                                     reference=cfg.kl_anchor() == "reference", pad_id=self.tokenizer.pad_token_id)
        template = PromptTemplate(self.tokenizer, cfg.data.template, cfg.data.few_shot, prompts, cfg.data.seed)
        self.prompts = prompts
        self.prompt_ids = [template.encode(r) for r in prompts]
        self.eval_prompts = eval_prompts
        self.eval_ids = [template.encode(r) for r in eval_prompts]
        self.gold = {r.id: r.gold_answer for r in prompts}  # monitoring only, and label_source=gt
        # the step scores its samples before the loss only where that is needed: the IQR filter's
        # entropies, Intuitor's self-certainty, the old log-probs of several updates per rollout
        self.score_first = (cfg.algo.iqr_filter or cfg.train.updates_per_rollout > 1
                            or cfg.reward.label_source == "intuitor")
        self.order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(cfg.data.seed))
        self.pools = self.grader = self.labels = None
        if self.rank0:
            self._start_rank0_services(hf_model)

    def _start_rank0_services(self, hf_model) -> None:
        from megatron_mgrpo.reward.equivalence import AnswerGrader
        from megatron_mgrpo.rollout.pools import EnginePool, RolloutPools

        cfg = self.cfg
        policy = EnginePool("policy", self._engines("policy", hf_model))
        momentum = EnginePool("momentum", self._engines("momentum")) if self.n else None
        self.pools = RolloutPools(policy, momentum)
        self.grader = AnswerGrader(cfg.reward.verify_workers, cfg.reward.verify_timeout_s)
        gold = self.gold if cfg.reward.label_source == "gt" else None
        self.labels = make_label_source(cfg.reward.label_source, self.grader, threshold=cfg.reward.vote_threshold,
                                        ttrl_train_samples=cfg.reward.ttrl_train_samples, gold=gold,
                                        vote_pool=cfg.reward.vote_pool)

    def _engines(self, pool: str, hf_model=None) -> list:
        """The pool's engines: the servers a launcher started and named in `MGRPO_<POOL>_URLS`
        (`mgrpo launch` does, one URL per engine), else one engine of our own. SGLang servers
        synced through a weight group (rollout.weight_sync resolves to distributed) share one per
        pool, `mgrpo-<pool>`: trainer rank 0 and the launch.rollout_tp GPUs of every server."""
        from megatron_mgrpo.rollout.pools import URLS_ENV
        from megatron_mgrpo.rollout.sglang_engine import weight_sync_mode
        from megatron_mgrpo.rollout.weight_broadcast import trainer_broadcaster

        urls = [url.strip() for url in os.environ.get(URLS_ENV[pool], "").split(",") if url.strip()]
        if urls and self.cfg.rollout.engine == "hf":
            raise ValueError(f"{URLS_ENV[pool]} names rollout servers, but rollout.engine=hf samples in-process: "
                             f"set rollout.engine to the servers' kind (vllm or sglang), or unset {URLS_ENV[pool]}")
        broadcaster = None
        if urls and self.cfg.rollout.engine == "sglang" and weight_sync_mode(self.cfg) == "distributed":
            broadcaster = trainer_broadcaster(f"mgrpo-{pool}", len(urls) * self.cfg.launch.rollout_tp,
                                              remote=not all(map(_on_this_host, urls)))
        return ([self._engine(pool, url=url, index=i, broadcaster=broadcaster) for i, url in enumerate(urls)]
                or [self._engine(pool, hf_model)])

    def _engine(self, name: str, hf_model=None, url: str | None = None, index: int = 0, broadcaster=None):
        """A rollout engine on the starting weights: in-process, a vLLM / SGLang server started with
        `launch.engine_python` (an environment that has the server installed), or the server at
        `url` (engine `index` of its pool). Weights reach a server through files: shared memory on
        this host, the run directory (a file system the cluster shares) for a server elsewhere;
        but an SGLang server at `url` given its pool's `broadcaster` gets them through the pool's
        weight group, its launch.rollout_tp ranks from 1 + index * launch.rollout_tp on."""
        kind, python, logs = self.cfg.rollout.engine, self.cfg.launch.engine_python, self.run_dir / "logs"
        server = {"url": url}
        if url and not _on_this_host(url):
            server["weights_dir"] = self.run_dir / "weight-sync"
        if kind == "vllm":
            from megatron_mgrpo.rollout.vllm_engine import VLLMEngine

            return VLLMEngine(self.model_dir, python=python, log_dir=logs, name=name,
                              dtype=str(self.policy.dtype).removeprefix("torch."),
                              max_model_len=self.cfg.launch.max_prompt_tokens + self.cfg.rollout.max_new_tokens,
                              **server)
        if kind == "sglang":
            from megatron_mgrpo.rollout.sglang_engine import SGLangEngine

            if broadcaster is not None:
                tp = self.cfg.launch.rollout_tp
                server.update(weight_sync="distributed", tp_size=tp, broadcaster=broadcaster,
                              rank_offset=1 + index * tp)
            return SGLangEngine(self.model_dir, python=python, log_dir=logs, name=name,
                                routed_experts=self.cfg.train.routing_replay, **server)
        from transformers import AutoModelForCausalLM

        from megatron_mgrpo.rollout.hf_engine import HFEngine

        model = hf_model or AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32)
        return HFEngine(model, self.tokenizer, routed_experts=self.cfg.train.routing_replay)

    # ------------------------------------------------------------------------------ the step

    def step(self, step: int, phase) -> dict[str, float]:
        """One M-GRPO step; `phase(name)` times its parts."""
        cfg, m, g = self.cfg, self.m, self.m + self.n
        batch = self.batch_indices(step)
        with phase("rollout"):
            samples = self.sample(batch, step) if self.rank0 else None
            sequences = _broadcast(_train_sequences(samples, cfg.train.routing_replay) if self.rank0 else None)
        with phase("logprobs"):
            scores = None if not self.score_first else self.policy.score(
                sequences, cfg.rollout.temperature, self_certainty=cfg.reward.label_source == "intuitor")
        with phase("rewards"):
            graded = _broadcast(self.rewards(batch, samples, scores) if self.rank0 else None)
        with phase("anchor"):  # monitoring only: how far the momentum model is from the policy
            anchor = self.anchor_metrics(sequences, scores, len(batch)) if self.anchor_due(step) else {}
        with phase("filter"):
            entropy = torch.tensor([h.mean() if len(h) else math.nan for h in scores.entropy]).view(len(batch), g) \
                if scores is not None else None
            confident = iqr_keep_mask(entropy, cfg.algo.iqr_k)[:, :m] if cfg.algo.iqr_filter \
                else torch.ones(len(batch), m, dtype=torch.bool)
            keep = confident & graded.trainable
            advantages = group_advantages(graded.rewards, keep, cfg.algo.advantage_estimator)
            train_set = self.training_sequences(sequences, scores, advantages, keep, g)
        with phase("train"):
            metrics = {}
            for part in _split(len(train_set), cfg.train.updates_per_rollout):
                metrics = self.policy.train_step(train_set.subset(part), self.objective, cfg.rollout.temperature)
                momentum = self.policy.update_momentum()
        with phase("sync"):
            self.sync_weights(step + 1)
        trained_entropy = metrics.pop("entropy", math.nan)
        kl = {"kl/mean": metrics.pop("kl")} if "kl" in metrics else {}
        return {**graded.metrics, **{f"train/{k}": v for k, v in metrics.items()}, **kl, **anchor,
                "entropy/mean": float(entropy[:, :m].nanmean()) if scores is not None else trained_entropy,
                "iqr/drop_rate": float(1 - keep.float().mean()), "iqr/kept": int(keep.sum()),
                **_filter_metrics(graded, confident), **({"momentum/m": momentum} if self.n else {}),
                "generated_tokens": graded.generated_tokens}

    def anchor_due(self, step: int) -> bool:
        interval = self.cfg.log.anchor_interval
        return bool(self.n and interval and step % interval == 0)

    def anchor_metrics(self, sequences: TrainSequences, scores, prompts: int) -> dict[str, float]:
        """KL(policy || momentum) per token on the policy's own samples (k3, at the sampling
        temperature), and ||theta - theta_momentum|| beside ||theta - theta_0||: is the anchor near
        the policy, or far behind it? Both before this step's update; monitoring only."""
        g, temperature = self.m + self.n, self.cfg.rollout.temperature
        rows = [p * g + i for p in range(prompts) for i in range(self.m)]
        own = sequences.subset(rows)
        policy_logp = [scores.logprobs[r] for r in rows] if scores is not None else \
            self.policy.score(own, temperature).logprobs
        momentum_logp = self.policy.score(own, temperature, weights="momentum").logprobs
        kl = torch.cat([kl_penalty(lp, mp, "k3") for lp, mp in zip(policy_logp, momentum_logp)])
        metrics = {"anchor/kl": float(kl.mean()) if len(kl) else math.nan,
                   "anchor/distance": self.policy.weight_distance("momentum")}
        if self.policy.reference is not None:
            metrics["anchor/distance_initial"] = self.policy.weight_distance("reference")
        return metrics

    def objective(self, batch: MicroBatch, logp: torch.Tensor):
        """PPO-clip surrogate with truncated IS against the engine, plus the KL penalty, over the
        responses flagged `trained`; the old log-probs are the scoring pass's, or (one on-policy
        update, not scored before) the update's own. The KL is measured whenever the anchor's
        log-probs are there, and is part of the loss only with algo.kl_coef > 0."""
        algo, fields = self.cfg.algo, batch.fields
        mask = batch.response_mask & (fields["trained"][:, None] > 0)
        old_logp = fields["old_logp"] if "old_logp" in fields else logp.detach()
        loss, stats = policy_loss(logp, old_logp, fields["advantage"], mask, clip_low=algo.clip_low,
                                  clip_high=algo.clip_high, rollout_logp=fields["rollout_logp"],
                                  tis_cap=algo.tis_cap, tis_mode=algo.tis_mode, agg=algo.loss_agg)
        if "ref_logp" in fields:
            kl = aggregate(kl_penalty(logp, fields["ref_logp"], algo.kl_estimator), mask, algo.loss_agg)
            if algo.kl_coef > 0:
                loss = loss + algo.kl_coef * kl
            stats["kl"] = kl.detach()
        return loss, aggregation_units(mask, algo.loss_agg), {k: float(v) for k, v in stats.items()}

    def training_sequences(self, sequences: TrainSequences, scores, advantages: torch.Tensor, keep: torch.Tensor,
                           g: int) -> TrainSequences:
        """The policy responses the update reads, with advantages, a `trained` flag (`keep`) and,
        with a KL anchor (a KL penalty's, or log.drift's), its log-probs. Scored before training:
        the kept ones, with their old log-probs. Not scored: all of them (the flag masks the loss),
        so that the update's forward measures the entropy of every policy response."""
        prompts, m = keep.shape
        rows = [(p, i) for p in range(prompts) for i in range(m) if scores is None or keep[p, i]]
        chosen = sequences.subset([p * g + i for p, i in rows])
        chosen.sequence_fields["advantage"] = [float(advantages[p, i]) for p, i in rows]
        chosen.sequence_fields["trained"] = [float(keep[p, i]) for p, i in rows]
        if scores is not None:
            chosen.token_fields["old_logp"] = [scores.logprobs[p * g + i] for p, i in rows]
        if anchor := self.cfg.kl_anchor():
            reference = self.policy.score(chosen, self.cfg.rollout.temperature, weights=anchor)
            chosen.token_fields["ref_logp"] = reference.logprobs
        return chosen

    # ------------------------------------------------------------------------------ rank 0

    def batch_indices(self, step: int) -> list[int]:
        """The step's prompts: a fixed shuffle, walked in order (so a resumed run continues it)."""
        size = self.cfg.train.prompts_per_step
        return [int(self.order[(step * size + i) % len(self.order)]) for i in range(size)]

    def sampling(self, step: int, offset: int = 0) -> SamplingParams:
        r = self.cfg.rollout
        return SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, max_new_tokens=r.max_new_tokens,
                              seed=self.cfg.train.seed + 1000 * step + offset)

    def sample(self, batch: list[int], step: int) -> list[list[Sample]]:
        """Per prompt, its M policy samples then its N momentum samples (rank 0)."""
        prompts = [self.prompt_ids[i] for i in batch]
        policy_samples = self.pools.policy.generate(prompts, self.m, self.sampling(step))
        momentum_samples = (self.pools.momentum.generate(prompts, self.n, self.sampling(step, offset=1))
                            if self.n else [[] for _ in prompts])
        return [ps + ms for ps, ms in zip(policy_samples, momentum_samples)]

    def rewards(self, batch: list[int], samples: list[list[Sample]], scores) -> Rewards:
        """Extract, vote and reward (rank 0). Intuitor's reward is each policy response's
        self-certainty under the trainer's policy, from the scoring pass (`scores`)."""
        cfg, m, g = self.cfg, self.m, self.m + self.n
        mode = cfg.reward.extraction
        certainty = None
        if cfg.reward.label_source == "intuitor":
            certainty = [scores.self_certainty[p * g:p * g + m] for p in range(len(batch))]
        groups = [PromptGroup(self.prompts[i].id, [extract_answer(s.text, mode) for s in group[:m]],
                              [extract_answer(s.text, mode) for s in group[m:]], certainty[p] if certainty else None)
                  for p, (i, group) in enumerate(zip(batch, samples))]
        results = self.labels.label(groups)
        rewards = torch.zeros(len(batch), m)
        trainable = torch.zeros(len(batch), m, dtype=torch.bool)
        for p, result in enumerate(results):  # ttrl rewards only its first ttrl_train_samples responses
            rewards[p, :len(result.rewards)] = torch.tensor(result.rewards)
            trainable[p, :len(result.rewards)] = result.trained
        flat = [s for group in samples for s in group]
        prompt_ids = [self.prompts[i].id for i in batch]
        metrics = self.label_metrics(groups, results, flat, prompt_ids)
        return Rewards(rewards, trainable, self.gold_correct(groups, prompt_ids), metrics,
                       sum(len(s.response_ids) for s in flat))

    def gold_correct(self, groups, prompt_ids: list[str]) -> torch.Tensor:
        """[P, M]: whether each policy answer equals gold (NaN where the prompt has none). Monitoring only."""
        correct = torch.full((len(groups), self.m), math.nan)
        pools = [[self.gold.get(pid)] + g.policy_answers for g, pid in zip(groups, prompt_ids)]
        for p, (pool, classes) in enumerate(zip(pools, self.grader.group_many(pools))):
            if pool[0] is not None:
                correct[p] = torch.tensor([float(classes[0] is not None and c == classes[0]) for c in classes[1:]])
        return correct

    def label_metrics(self, groups, results, samples: list[Sample], prompt_ids: list[str]) -> dict[str, float]:
        """Label-free health signals, plus pseudo-label accuracy against gold (monitoring only)."""
        answered = [a is not None for g in groups for a in g.policy_answers]
        metrics = {"reward/mean": float(torch.tensor([r for res in results for r in res.rewards]).mean()),
                   "label/labelled": sum(r.trained for r in results) / len(results),
                   "label/share_mean": sum(r.share for r in results) / len(results),
                   "answer/rate": sum(answered) / len(answered),
                   "response/length_mean": sum(len(s.response_ids) for s in samples) / len(samples),
                   "response/truncated": sum(s.finish_reason == "length" for s in samples) / len(samples)}
        accuracy = pseudo_label_accuracy(results, prompt_ids, self.gold, self.grader)
        if accuracy is not None:
            metrics["label/accuracy"] = accuracy
        if self.n:
            metrics |= self.vote_metrics(groups, results, prompt_ids)
        return metrics

    def vote_metrics(self, groups, results, prompt_ids: list[str]) -> dict[str, float]:
        """What the momentum model's votes do (monitoring only): does the policy's own vote agree
        with the momentum model's, how often the label differs from the policy-only vote (flip
        rate), and how often each vote (policy alone, momentum alone, the label) equals gold."""
        rows = [[self.gold.get(pid), r.label, vote(g.policy_answers, self.grader).label,
                 vote(g.momentum_answers, self.grader).label] for g, r, pid in zip(groups, results, prompt_ids)]
        classes = self.grader.group_many(rows)
        metrics = {"label/agreement": _share([c[2] is not None and c[2] == c[3] for c in classes]),
                   "anchor/flip_rate": _share([c[1] != c[2] for c in classes])}
        graded = [c for row, c in zip(rows, classes) if row[0] is not None]
        for name, column in (("label", 1), ("policy", 2), ("momentum", 3)):
            if graded:
                metrics[f"vote/{name}_correct"] = _share([c[column] is not None and c[column] == c[0] for c in graded])
        return metrics

    def true_accuracy(self, pool: str = "policy") -> float | None:
        """pass@1 of the current policy (or momentum model) on the evaluation prompts, averaged over
        `eval.samples` samples each and graded against gold (rank 0; monitoring only)."""
        if not self.eval_prompts:
            return None
        e = self.cfg.eval
        sampling = SamplingParams(temperature=e.temperature or 1.0, top_k=-1 if e.temperature else 1,
                                  max_new_tokens=self.cfg.rollout.max_new_tokens, seed=self.cfg.train.seed)
        samples = getattr(self.pools, pool).generate(self.eval_ids, e.samples, sampling)
        pairs = [[r.gold_answer] + [extract_answer(s.text, self.cfg.reward.extraction) for s in group]
                 for group, r in zip(samples, self.eval_prompts)]
        classes = self.grader.group_many(pairs)
        correct = [c[0] is not None and answer == c[0] for c in classes for answer in c[1:]]
        return sum(correct) / len(correct)

    def sync_weights(self, version: int) -> None:
        """Push the policy to the policy engines, and the momentum weights at their own interval.

        Every rank walks the export (it gathers over TP, EP and stages); rank 0 hands the tensors
        to its engines."""
        momentum_due = self.n and version % self.cfg.rollout.momentum_sync_interval == 0
        names = ["policy", "momentum"] if momentum_due else ["policy"]
        for name in names:
            weights = self.policy.hf_weights(name)
            if not self.rank0:
                for _ in weights:
                    pass
                continue
            named = list(weights)
            getattr(self.pools, name).update_weights(lambda: iter(named), version)

    def close(self) -> None:
        if self.grader is not None:
            self.grader.close()
        for pool in (self.pools.policy, self.pools.momentum) if self.pools else ():
            for engine in pool.engines if pool else ():
                engine.shutdown()


def _train_sequences(samples: list[list[Sample]], routing: bool) -> TrainSequences:
    """Prompt-major sequences: prompt p owns rows p*G .. p*G+G-1, its M policy responses first,
    then its N momentum ones; with the engine's log-probs and (routing replay) expert choices."""
    flat = [s for group in samples for s in group]
    return TrainSequences([s.prompt_ids + s.response_ids for s in flat], [len(s.prompt_ids) for s in flat],
                          {"rollout_logp": [s.logprobs for s in flat]},
                          routing=[s.routed_experts for s in flat] if routing else None)


def _on_this_host(url: str) -> bool:
    return urlsplit(url).hostname in _this_host_names()


@functools.cache
def _this_host_names() -> frozenset[str]:
    """Looked up once: `getfqdn` may ask DNS, and every server URL is checked, some twice."""
    return frozenset(("localhost", "127.0.0.1", "::1", socket.gethostname(), socket.getfqdn()))


def _filter_metrics(graded: Rewards, confident: torch.Tensor) -> dict[str, float]:
    """What the IQR filter dropped, against what it kept, among the responses that had a reward:
    their mean reward and gold correctness (monitoring: does it drop confident correct answers?)."""
    dropped, kept = ~confident & graded.trainable, confident & graded.trainable
    metrics = {"iqr/dropped": int(dropped.sum())}
    for name, mask in (("dropped", dropped), ("kept", kept)):
        if mask.any():
            metrics[f"iqr/{name}_reward"] = float(graded.rewards[mask].mean())
            if not graded.correct[mask].isnan().all():
                metrics[f"iqr/{name}_correct"] = float(graded.correct[mask].nanmean())
    return metrics


def _share(flags: list[bool]) -> float:
    return sum(flags) / len(flags) if flags else math.nan


def _split(count: int, parts: int) -> list[list[int]]:
    """`range(count)` in `parts` contiguous chunks (mini-batches of one rollout batch)."""
    bounds = [round(i * count / parts) for i in range(parts + 1)]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(parts)]


def _broadcast(value):
    """`value` from rank 0 on every rank."""
    if dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------------------- the run


def train(cfg: Config, run_dir: Path, console=None) -> dict:
    """Run M-GRPO (or a baseline) as `cfg` says, into `run_dir`; resumes from its newest complete
    checkpoint. Returns the summary (on every rank)."""
    from megatron_mgrpo import metrics as metrics_lib
    from megatron_mgrpo.data.splits import build_splits
    from megatron_mgrpo.models.builtin import default_cache_dir, resolve_model_path
    from megatron_mgrpo.parallel.dist import destroy_distributed, init_distributed
    from megatron_mgrpo.train.checkpoint import load_latest_checkpoint, save_checkpoint
    from megatron_mgrpo.warmstart import warm_start

    started = time.perf_counter()
    p = cfg.parallel
    init_distributed(tp=p.tp, pp=p.pp, ep=p.ep, cp=p.cp, seed=cfg.train.seed)
    rank0 = dist.get_rank() == 0
    say = (console.print if console else print) if rank0 else (lambda *a, **k: None)
    trainer = sink = None
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if rank0:
            (run_dir / "config.yaml").write_text(to_yaml(cfg))
        # rank 0 writes a builtin model (transformers' save_pretrained writes weights only on rank 0
        # of an initialised process group, so other ranks would publish a directory without them)
        model_dir = _broadcast(resolve_model_path(cfg.model.path) if rank0 else None)
        splits = build_splits(cfg)  # before any expensive work: bad or overlapping data stops here
        split_report = splits.report()
        if rank0:
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
        trainer.sync_weights(start)  # also servers a launcher started from model.path get the weights we start from
        state["momentum_shard_mib"] = round(policy.momentum.nbytes / 2**20, 2)  # rank 0's fp32 EMA shards
        if rank0:
            sink = metrics_lib.MetricsSink(run_dir, cfg.train.steps, start_step=start, wandb_mode=cfg.log.wandb,
                                           wandb_project=cfg.log.wandb_project, config=dataclasses.asdict(cfg),
                                           console=console, tensorboard=cfg.log.tensorboard)
            if start == 0 and trainer.eval_prompts:
                state["initial_true_accuracy"] = trainer.true_accuracy()
            sink.timer.take()  # set-up time is not step 0's
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
                alarm = metrics_lib.collapse_alarm([*sink.history, record])
                record["alarm/collapse"] = float(alarm.alarm)
                sink.log(step, record, tokens=record["generated_tokens"])
            if (step + 1) % cfg.checkpoint.interval == 0 or last:
                state["wall_seconds"] = earlier_seconds + time.perf_counter() - started
                state = _broadcast(state)
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
            metrics_lib.plot_metrics(run_dir)
            metrics_lib.print_summary(summary, console)
        return _broadcast(summary)
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


def export_hf(trainer: Trainer, out: Path) -> None:
    """The policy and the momentum model as loadable HF directories (`out/policy`, `out/momentum`)."""
    from transformers import AutoModelForCausalLM

    from megatron_mgrpo.models.weight_map import load_checkpoint_tensors

    for which in ("policy", "momentum"):
        weights = dict(trainer.policy.hf_weights(which))
        if dist.get_rank() == 0:
            model = AutoModelForCausalLM.from_pretrained(trainer.model_dir, dtype=torch.float32)
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
