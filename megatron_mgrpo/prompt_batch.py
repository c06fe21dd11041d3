"""A step's prompts after rollout, scoring, rewards and the IQR filter, kept prompt by prompt so
that dynamic sampling (rollout.filter_groups) can drop the prompts that teach nothing and add
others: prompt p owns the sequence rows p*G .. p*G+G-1, its M policy responses first."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from megatron_mgrpo.train.batching import TrainSequences


@dataclasses.dataclass
class Rewards:
    """The rewards of a batch's prompts, identical on every rank."""

    rewards: torch.Tensor  # [P, M]
    trainable: torch.Tensor  # [P, M] bool: the response has a reward (its prompt got a label; ttrl: a subset)
    correct: torch.Tensor  # [P, M] 1 / 0: the answer equals gold, NaN without gold (monitoring only)
    metrics: dict[str, float]
    generated_tokens: int


@dataclasses.dataclass
class PromptBatch:
    prompts: list[int]  # indices into the trainer's prompts
    sequences: TrainSequences
    scores: object | None  # train.policy.Scores of every sequence, when the step scored before the loss
    graded: Rewards
    confident: torch.Tensor  # [P, M] bool: kept by the IQR filter
    group_size: int

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def keep(self) -> torch.Tensor:
        """[P, M]: the responses the loss reads (kept by the filter and rewarded)."""
        return self.confident & self.graded.trainable

    def informative(self) -> list[int]:
        """The prompts whose kept responses do not all have the same reward: the others have zero
        advantages (unanimous, unlabelled, or filtered to fewer than two) and teach nothing."""
        rewards, keep = self.graded.rewards, self.keep
        return [p for p in range(len(self)) if keep[p].sum() >= 2
                and rewards[p][keep[p]].max() > rewards[p][keep[p]].min()]

    def select(self, prompts: Sequence[int]) -> PromptBatch:
        g, prompts = self.group_size, list(prompts)
        rows = [p * g + i for p in prompts for i in range(g)]
        scores = None if self.scores is None else dataclasses.replace(
            self.scores, logprobs=_rows(self.scores.logprobs, rows), entropy=_rows(self.scores.entropy, rows),
            self_certainty=_rows(self.scores.self_certainty, rows))
        graded = dataclasses.replace(self.graded, rewards=self.graded.rewards[prompts],
                                     trainable=self.graded.trainable[prompts], correct=self.graded.correct[prompts])
        return PromptBatch([self.prompts[p] for p in prompts], self.sequences.subset(rows), scores, graded,
                           self.confident[prompts], g)

    def joined(self, other: PromptBatch) -> PromptBatch:
        """These prompts, then `other`'s; the label metrics stay this batch's, the token count adds up."""
        scores = None if self.scores is None else dataclasses.replace(
            self.scores, logprobs=self.scores.logprobs + other.scores.logprobs,
            entropy=self.scores.entropy + other.scores.entropy,
            self_certainty=None if self.scores.self_certainty is None
            else self.scores.self_certainty + other.scores.self_certainty)
        graded = Rewards(torch.cat([self.graded.rewards, other.graded.rewards]),
                         torch.cat([self.graded.trainable, other.graded.trainable]),
                         torch.cat([self.graded.correct, other.graded.correct]), self.graded.metrics,
                         self.graded.generated_tokens + other.graded.generated_tokens)
        return PromptBatch(self.prompts + other.prompts, self.sequences.joined(other.sequences), scores, graded,
                           torch.cat([self.confident, other.confident]), self.group_size)


def _rows(values: list | None, rows: list[int]) -> list | None:
    return None if values is None else [values[r] for r in rows]
