"""The M-GRPO trainer: one step, top to bottom (the run around it is `megatron_mgrpo.run`).

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

import math
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_mgrpo.algo import aggregate, aggregation_units, group_advantages, iqr_keep_mask, kl_penalty, policy_loss
from megatron_mgrpo.answer_format import extract_answer
from megatron_mgrpo.config import Config
from megatron_mgrpo.data.records import PromptRecord
from megatron_mgrpo.evaluate import grade_prompts
from megatron_mgrpo.parallel.collectives import broadcast_from_rank0
from megatron_mgrpo.prompt_batch import PromptBatch, Rewards
from megatron_mgrpo.reward.labels import PromptGroup, make_label_source
from megatron_mgrpo.rollout.types import Sample, SamplingParams
from megatron_mgrpo.step_metrics import filter_metrics, gold_correct, label_metrics, rollout_metrics
from megatron_mgrpo.train.batching import MicroBatch, TrainSequences


class Trainer:
    """Owns the policy (Megatron), the engines and grader (rank 0), and the step."""

    def __init__(self, cfg: Config, run_dir: Path, model_dir: Path, prompts: list[PromptRecord],
                 eval_prompts: list[PromptRecord]):
        from transformers import AutoTokenizer

        from megatron_mgrpo.data.templates import PromptTemplate
        from megatron_mgrpo.models.hf_config import model_spec_from_hf
        from megatron_mgrpo.models.loading import load_hf_model
        from megatron_mgrpo.train.policy import MegatronPolicy

        self.cfg, self.run_dir, self.model_dir = cfg, run_dir, model_dir
        self.m, self.n = cfg.samples_per_prompt()
        self.rank0 = dist.get_rank() == 0
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        hf_model = load_hf_model(model_dir)
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
        # entropies, Intuitor's self-certainty, the old log-probs of several updates per rollout or
        # of samples made on older weights (asynchronous rollout)
        self.score_first = (cfg.algo.iqr_filter or cfg.train.updates_per_rollout > 1
                            or cfg.reward.label_source == "intuitor" or cfg.rollout.max_staleness > 0)
        self.order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(cfg.data.seed))
        # dynamic sampling's further prompts: a second fixed shuffle, indexed by step (resume-safe)
        self.refill_order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(cfg.data.seed + 1))
        self.pools = self.grader = self.labels = None
        self.producers = {}  # pool name -> RolloutProducer, with asynchronous rollout (rank 0)
        if self.rank0:
            self._start_rank0_services(hf_model)

    def _start_rank0_services(self, hf_model) -> None:
        from megatron_mgrpo.reward.equivalence import AnswerGrader
        from megatron_mgrpo.rollout.build import build_pools

        cfg = self.cfg
        self.pools = build_pools(cfg, self.run_dir, self.model_dir, self.tokenizer, hf_model,
                                 dtype=str(self.policy.dtype).removeprefix("torch."))
        self.grader = AnswerGrader(cfg.reward.verify_workers, cfg.reward.verify_timeout_s)
        gold = self.gold if cfg.reward.label_source == "gt" else None
        self.labels = make_label_source(cfg.reward.label_source, self.grader, threshold=cfg.reward.vote_threshold,
                                        ttrl_train_samples=cfg.reward.ttrl_train_samples, gold=gold,
                                        vote_pool=cfg.reward.vote_pool)

    # ------------------------------------------------------------------------------ the step

    def step(self, step: int, phase) -> dict[str, float]:
        """One M-GRPO step; `phase(name)` times its parts."""
        cfg, m, g = self.cfg, self.m, self.m + self.n
        batch = self.collect(self.batch_indices(step), step, phase)
        with phase("anchor"):  # monitoring only: how far the momentum model is from the policy
            anchor = self.anchor_metrics(batch.sequences, batch.scores, len(batch)) if self.anchor_due(step) else {}
            if self.rank0:
                anchor |= rollout_metrics(self.sample_versions, step, cfg.rollout.max_staleness,
                                          sum(p.regenerated for p in self.producers.values()), batch.sequences,
                                          batch.scores, m, g)
        anchor["dynamic/informative_share"] = len(batch.informative()) / len(batch)
        if cfg.rollout.filter_groups:  # dynamic sampling: only prompts whose rewards differ
            batch, refilled = self.refill(batch, step, phase)
            anchor |= refilled
        with phase("filter"):
            keep = batch.keep
            advantages = group_advantages(batch.graded.rewards, keep, cfg.algo.advantage_estimator)
            train_set = self.training_sequences(batch.sequences, batch.scores, advantages, keep, g)
        with phase("train"):
            metrics = {}
            for part in _split(len(train_set), cfg.train.updates_per_rollout):
                metrics = self.policy.train_step(train_set.subset(part), self.objective, cfg.rollout.temperature)
                momentum = self.policy.update_momentum()
        with phase("sync"):
            self.sync_weights(step + 1)
        trained_entropy = metrics.pop("entropy", math.nan)
        kl = {"kl/mean": metrics.pop("kl")} if "kl" in metrics else {}
        entropy = float(_entropy(batch)[:, :m].nanmean()) if batch.scores is not None else trained_entropy
        return {**batch.graded.metrics, **{f"train/{k}": v for k, v in metrics.items()}, **kl, **anchor,
                "entropy/mean": entropy,
                "iqr/drop_rate": float(1 - keep.float().mean()), "iqr/kept": int(keep.sum()),
                **filter_metrics(batch.graded, batch.confident), **({"momentum/m": momentum} if self.n else {}),
                "generated_tokens": batch.graded.generated_tokens}

    def collect(self, prompts: list[int], step: int, phase, refill: int | None = None) -> PromptBatch:
        """Rollout, scoring, rewards and the IQR filter of `prompts`: the step's own, or (`refill`:
        the round of dynamic sampling) further ones, sampled now."""
        cfg, m, g = self.cfg, self.m, self.m + self.n
        with phase("rollout"):
            samples = self.sample(prompts, step, refill) if self.rank0 else None
            sequences = broadcast_from_rank0(
                _train_sequences(samples, cfg.train.routing_replay) if self.rank0 else None)
        with phase("logprobs"):
            scores = None if not self.score_first else self.policy.score(
                sequences, cfg.rollout.temperature, self_certainty=cfg.reward.label_source == "intuitor")
        with phase("rewards"):
            graded = broadcast_from_rank0(self.rewards(prompts, samples, scores) if self.rank0 else None)
        with phase("filter"):
            batch = PromptBatch(prompts, sequences, scores, graded, torch.ones(len(prompts), m, dtype=torch.bool), g)
            if cfg.algo.iqr_filter:
                batch.confident = iqr_keep_mask(_entropy(batch), cfg.algo.iqr_k)[:, :m]
        return batch

    def refill(self, batch: PromptBatch, step: int, phase) -> tuple[PromptBatch, dict[str, float]]:
        """The first train.prompts_per_step informative prompts of `batch` and of further prompts
        drawn until there are that many, at most rollout.max_oversample x prompts_per_step drawn in
        all (then the step trains on fewer, or on the batch as it was when none is informative)."""
        want = self.cfg.train.prompts_per_step
        limit = math.floor(self.cfg.rollout.max_oversample * want)
        chosen, drawn, rounds = batch.select(batch.informative()), len(batch), 0
        while len(chosen) < want and drawn < limit:
            extra = [int(self.refill_order[(step * limit + drawn + i) % len(self.refill_order)])
                     for i in range(min(want - len(chosen), limit - drawn))]
            more = self.collect(extra, step, phase, refill=rounds)
            chosen, drawn, rounds = chosen.joined(more.select(more.informative())), drawn + len(extra), rounds + 1
        chosen = chosen.select(range(min(want, len(chosen)))) if len(chosen) else batch
        return chosen, {"dynamic/drawn": drawn, "dynamic/trained_prompts": len(chosen),
                        "dynamic/trained_informative": len(chosen.informative())}

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

    def sample(self, batch: list[int], step: int, refill: int | None = None) -> list[list[Sample]]:
        """Per prompt, its M policy samples then its N momentum samples (rank 0): made now, or
        taken from the producers that made them ahead (asynchronous rollout); a dynamic-sampling
        `refill` round is always made now, with seeds of its own."""
        if self.producers and refill is None:
            policy_samples = self.producers["policy"].take(step)
            momentum_samples = self.producers["momentum"].take(step) if self.n else [[] for _ in batch]
        else:
            prompts = [self.prompt_ids[i] for i in batch]
            offset = 0 if refill is None else 2 + 2 * refill
            policy_samples, momentum_samples = self.pools.sample(prompts, self.m, self.n, self.sampling(step, offset),
                                                                 self.sampling(step, offset + 1))
        if refill is None:
            self.sample_versions = [s.weights_version for group in policy_samples for s in group]
        return [ps + ms for ps, ms in zip(policy_samples, momentum_samples)]

    def start_rollout(self, start: int, bounds: tuple[int, int] | None = None) -> None:
        """Start the producers that make the steps' samples ahead, from step `start` on (rank 0;
        after the engines got its weights), with the (policy, momentum) staleness `bounds`, by
        default rollout.max_staleness and momentum_max_staleness when either is > 0."""
        r = self.cfg.rollout
        if bounds is None and (r.max_staleness or r.momentum_max_staleness):
            bounds = (r.max_staleness, r.momentum_max_staleness)
        if not self.rank0 or bounds is None:
            return
        from megatron_mgrpo.rollout.producer import RolloutProducer

        def pool_samples(pool: str, count: int, offset: int):
            return lambda step: getattr(self.pools, pool).generate(
                [self.prompt_ids[i] for i in self.batch_indices(step)], count, self.sampling(step, offset))

        self.producers["policy"] = RolloutProducer(self.pools.policy, pool_samples("policy", self.m, 0),
                                                   bound=bounds[0], start=start, end=self.cfg.train.steps)
        if self.n:
            self.producers["momentum"] = RolloutProducer(
                self.pools.momentum, pool_samples("momentum", self.n, 1), bound=bounds[1],
                start=start, end=self.cfg.train.steps, sync_interval=r.momentum_sync_interval)

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
        metrics = label_metrics(groups, results, flat, prompt_ids, self.gold, self.grader, momentum=bool(self.n))
        return Rewards(rewards, trainable, gold_correct(groups, prompt_ids, self.gold, self.grader, m), metrics,
                       sum(len(s.response_ids) for s in flat))

    def true_accuracy(self, pool: str = "policy") -> float | None:
        """pass@1 of the current policy (or momentum model) on the evaluation prompts, averaged over
        `eval.samples` samples each and graded against gold (rank 0; monitoring only)."""
        if not self.eval_prompts:
            return None
        e = self.cfg.eval
        sampling = SamplingParams(temperature=e.temperature or 1.0, top_k=-1 if e.temperature else 1,
                                  max_new_tokens=self.cfg.rollout.max_new_tokens, seed=self.cfg.train.seed)
        samples = getattr(self.pools, pool).generate(self.eval_ids, e.samples, sampling)
        answers = [[extract_answer(s.text, self.cfg.reward.extraction) for s in group] for group in samples]
        scores = grade_prompts(answers, [r.gold_answer for r in self.eval_prompts], self.grader)
        return sum(s.correct for s in scores) / (e.samples * len(scores))

    def sync_weights(self, version: int, every_pool: bool = False) -> None:
        """Push the policy to the policy engines, and the momentum weights at their own interval
        (`every_pool`: now, as when a run starts or resumes).

        Every rank walks the export (it gathers over TP, EP and stages); rank 0 hands the tensors
        to its engines."""
        momentum_due = self.n and (every_pool or version % self.cfg.rollout.momentum_sync_interval == 0)
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
        for producer in self.producers.values():
            producer.close()
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


def _split(count: int, parts: int) -> list[list[int]]:
    """`range(count)` in `parts` contiguous chunks (mini-batches of one rollout batch)."""
    bounds = [round(i * count / parts) for i in range(parts + 1)]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(parts)]


def _entropy(batch: PromptBatch) -> torch.Tensor:
    """[P, G]: each response's mean token entropy under the trainer (NaN for an empty response)."""
    return torch.tensor([h.mean() if len(h) else math.nan for h in batch.scores.entropy]).view(
        len(batch), batch.group_size)
