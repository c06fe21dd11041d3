"""What a step logs beside its loss (monitoring only: nothing here reaches a reward or a gradient):
label health and pseudo-label accuracy, what the momentum model's votes change, each policy
answer's gold correctness, what the IQR filter drops, and how old the rollout's weights were."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from megatron_mgrpo.reward.labels import pseudo_label_accuracy
from megatron_mgrpo.reward.voting import vote
from megatron_mgrpo.rollout.types import Sample
from megatron_mgrpo.train.batching import TrainSequences


def label_metrics(groups, results, samples: list[Sample], prompt_ids: list[str], gold: Mapping[str, str | None],
                  grader, momentum: bool) -> dict[str, float]:
    """Label-free health signals, plus pseudo-label accuracy against gold (monitoring only)."""
    answered = [a is not None for g in groups for a in g.policy_answers]
    metrics = {"reward/mean": float(torch.tensor([r for res in results for r in res.rewards]).mean()),
               "label/labelled": sum(r.trained for r in results) / len(results),
               "label/share_mean": sum(r.share for r in results) / len(results),
               "answer/rate": sum(answered) / len(answered),
               "response/length_mean": sum(len(s.response_ids) for s in samples) / len(samples),
               "response/truncated": sum(s.finish_reason == "length" for s in samples) / len(samples)}
    accuracy = pseudo_label_accuracy(results, prompt_ids, gold, grader)
    if accuracy is not None:
        metrics["label/accuracy"] = accuracy
    if momentum:
        metrics |= vote_metrics(groups, results, prompt_ids, gold, grader)
    return metrics


def vote_metrics(groups, results, prompt_ids: list[str], gold: Mapping[str, str | None], grader) -> dict[str, float]:
    """What the momentum model's votes do (monitoring only): does the policy's own vote agree
    with the momentum model's, how often the label differs from the policy-only vote (flip
    rate), and how often each vote (policy alone, momentum alone, the label) equals gold."""
    rows = [[gold.get(pid), r.label, vote(g.policy_answers, grader).label,
             vote(g.momentum_answers, grader).label] for g, r, pid in zip(groups, results, prompt_ids)]
    classes = grader.group_many(rows)
    metrics = {"label/agreement": _share([c[2] is not None and c[2] == c[3] for c in classes]),
               "anchor/flip_rate": _share([c[1] != c[2] for c in classes])}
    graded = [c for row, c in zip(rows, classes) if row[0] is not None]
    for name, column in (("label", 1), ("policy", 2), ("momentum", 3)):
        if graded:
            metrics[f"vote/{name}_correct"] = _share([c[column] is not None and c[column] == c[0] for c in graded])
    return metrics


def gold_correct(groups, prompt_ids: list[str], gold: Mapping[str, str | None], grader, m: int) -> torch.Tensor:
    """[P, M]: whether each policy answer equals gold (NaN where the prompt has none). Monitoring only."""
    correct = torch.full((len(groups), m), math.nan)
    pools = [[gold.get(pid)] + g.policy_answers for g, pid in zip(groups, prompt_ids)]
    for p, (pool, classes) in enumerate(zip(pools, grader.group_many(pools))):
        if pool[0] is not None:
            correct[p] = torch.tensor([float(classes[0] is not None and c == classes[0]) for c in classes[1:]])
    return correct


def filter_metrics(graded, confident: torch.Tensor) -> dict[str, float]:
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


def rollout_metrics(versions: list[int], step: int, max_staleness: int, regenerated: int, sequences: TrainSequences,
                    scores, m: int, g: int) -> dict[str, float]:
    """How old the policy samples' weights were (staleness = step - weights version), how many
    step batches had to be made again for being too old, and the mean |trainer - engine|
    log-prob gap per token that TIS corrects, over the M policy samples of each of the G."""
    ages = step - torch.tensor(versions, dtype=torch.float64)
    metrics = {"rollout/staleness_mean": float(ages.mean()), "rollout/staleness_max": float(ages.max()),
               "rollout/regenerated": regenerated}
    metrics |= {f"rollout/staleness_{age}": float((ages == age).float().mean()) for age in range(max_staleness + 1)}
    if scores is not None:
        rows = [p * g + i for p in range(len(sequences) // g) for i in range(m)]
        gaps = torch.cat([(scores.logprobs[r] - torch.tensor(sequences.token_fields["rollout_logp"][r])).abs()
                          for r in rows])
        metrics["rollout/logprob_gap"] = float(gaps.mean()) if len(gaps) else math.nan
    return metrics


def _share(flags: list[bool]) -> float:
    return sum(flags) / len(flags) if flags else math.nan
