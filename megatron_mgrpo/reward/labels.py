"""Label sources: where a prompt's reward comes from. One setting, `reward.label_source`.

    mgrpo     vote over the policy's M and the momentum model's N answers; reward the policy's
              (vote_pool=momentum: the momentum model's N answers alone vote)
    srt       vote over the policy's own answers (self-rewarding baseline)
    ttrl      vote over the policy's whole pool; reward only the first `ttrl_train_samples`
    gt        gold answers (supervised RLVR): reward = equivalent to gold
    intuitor  the response's self-certainty (computed from token logits by the trainer)

Gold answers cannot reach a label-free reward: `PromptGroup`, the only input of `label`, has
no field that could carry one, and only `GoldLabels` is ever constructed with gold. Gold is
otherwise used by `pseudo_label_accuracy`, a monitoring metric.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from megatron_mgrpo.config import LABEL_SOURCES, VOTE_POOLS
from megatron_mgrpo.reward.equivalence import AnswerGrader
from megatron_mgrpo.reward.voting import Vote, vote


@dataclass(frozen=True)
class PromptGroup:
    """Everything a label source may see about one prompt: ids and extracted answers."""

    prompt_id: str
    policy_answers: list[str | None]
    momentum_answers: list[str | None] = field(default_factory=list)
    self_certainty: list[float] | None = None


@dataclass
class LabelResult:
    """rewards: one per trained policy response; trained=False means the prompt gets no gradient."""

    label: str | None
    share: float
    rewards: list[float]
    vote: Vote | None
    trained: bool


class LabelSource(Protocol):
    """Turns the answers of a batch of prompts into rewards for the policy's responses."""

    name: str

    def label(self, groups: list[PromptGroup]) -> list[LabelResult]: ...




class MajorityVote:
    """mgrpo and srt: reward = the policy answer is in the winning class of the voters' answers.

    voters: "policy" (srt), "pool" (mgrpo: policy + momentum) or "momentum" (mgrpo with the
    momentum model's answers alone: a label the policy's own samples cannot outvote)."""

    def __init__(self, grader: AnswerGrader, threshold: float, voters: str):
        if voters not in ("policy", *VOTE_POOLS):
            raise ValueError(f"reward.vote_pool={voters!r} is not one of {', '.join(VOTE_POOLS)}")
        self.grader, self.threshold, self.voters = grader, threshold, voters
        self.name = "srt" if voters == "policy" else "mgrpo"

    def label(self, groups: list[PromptGroup]) -> list[LabelResult]:
        # every answer is grouped, so that the policy's answers have classes whoever votes
        pools = [g.policy_answers + g.momentum_answers for g in groups]
        results = []
        for g, pool, classes in zip(groups, pools, self.grader.group_many(pools)):
            m = len(g.policy_answers)
            voters = {"policy": slice(0, m), "pool": slice(0, None), "momentum": slice(m, None)}[self.voters]
            result = vote(pool[voters], self.grader, self.threshold, classes=classes[voters])
            results.append(self._reward(result, classes[:m]))
        return results

    @staticmethod
    def _reward(result: Vote, trained_classes: list[int | None]) -> LabelResult:
        if result.label is None:
            return LabelResult(None, result.share, [0.0] * len(trained_classes), result, trained=False)
        rewards = [float(cls is not None and cls == result.winner) for cls in trained_classes]
        return LabelResult(result.label, result.share, rewards, result, trained=True)


class TTRL:
    """Vote over the whole pool of policy samples, train on the first `train_samples`."""

    name = "ttrl"

    def __init__(self, grader: AnswerGrader, threshold: float, train_samples: int):
        if train_samples < 1:
            raise ValueError(f"reward.ttrl_train_samples={train_samples} must be >= 1")
        self.grader, self.threshold, self.train_samples = grader, threshold, train_samples

    def label(self, groups: list[PromptGroup]) -> list[LabelResult]:
        for g in groups:
            if len(g.policy_answers) < self.train_samples:
                raise ValueError(f"prompt {g.prompt_id!r} has {len(g.policy_answers)} samples, fewer than "
                                 f"reward.ttrl_train_samples={self.train_samples}: raise rollout.group_size")
        votes = _votes([g.policy_answers for g in groups], self.grader, self.threshold)
        return [MajorityVote._reward(v, v.classes[:self.train_samples]) for v in votes]


class GoldLabels:
    """Supervised RLVR: reward = the answer is equivalent to the gold answer of the prompt."""

    name = "gt"

    def __init__(self, grader: AnswerGrader, gold: Mapping[str, str]):
        self.grader, self.gold = grader, gold

    def label(self, groups: list[PromptGroup]) -> list[LabelResult]:
        pools = []
        for g in groups:
            if self.gold.get(g.prompt_id) is None:
                raise ValueError(f"prompt {g.prompt_id!r} has no gold answer, which reward.label_source=gt needs: "
                                 f"map the answer column with data.fields.answer, or pick a label-free source")
            pools.append([self.gold[g.prompt_id]] + g.policy_answers)
        results = []
        for g, classes in zip(groups, self.grader.group_many(pools)):
            gold_class = classes[0]
            rewards = [float(gold_class is not None and cls == gold_class) for cls in classes[1:]]
            results.append(LabelResult(self.gold[g.prompt_id], 1.0, rewards, None, trained=True))
        return results


class SelfCertainty:
    """Intuitor: the reward of a response is its self-certainty; no answers, no votes."""

    name = "intuitor"

    def label(self, groups: list[PromptGroup]) -> list[LabelResult]:
        results = []
        for g in groups:
            if g.self_certainty is None or len(g.self_certainty) != len(g.policy_answers):
                raise ValueError(f"prompt {g.prompt_id!r}: reward.label_source=intuitor needs one self-certainty "
                                 f"score per policy response")
            results.append(LabelResult(None, 0.0, list(g.self_certainty), None, trained=True))
        return results


def _votes(pools: list[list[str | None]], grader: AnswerGrader, threshold: float) -> list[Vote]:
    return [vote(pool, grader, threshold, classes=classes) for pool, classes in zip(pools, grader.group_many(pools))]


def make_label_source(name: str, grader: AnswerGrader, *, threshold: float = 0.0, ttrl_train_samples: int = 16,
                      gold: Mapping[str, str] | None = None, vote_pool: str = "pool") -> LabelSource:
    """The label source called `name`; `gold` is accepted by `gt` only, `vote_pool` read by `mgrpo` only."""
    if name not in LABEL_SOURCES:
        raise ValueError(f"reward.label_source={name!r} is not one of {', '.join(LABEL_SOURCES)}")
    if name == "gt":
        if gold is None:
            raise ValueError("reward.label_source=gt needs gold answers: load a dataset with an answer column")
        return GoldLabels(grader, gold)
    if gold is not None:
        raise ValueError(f"reward.label_source={name} is label-free and must never receive gold answers; "
                         f"gold is for monitoring (pseudo_label_accuracy) only")
    if name == "intuitor":
        return SelfCertainty()
    if name == "ttrl":
        return TTRL(grader, threshold, ttrl_train_samples)
    return MajorityVote(grader, threshold, voters=vote_pool if name == "mgrpo" else "policy")


def pseudo_label_accuracy(results: list[LabelResult], prompt_ids: list[str], gold: Mapping[str, str],
                          grader: AnswerGrader) -> float | None:
    """Monitoring only: the fraction of labelled prompts whose pseudo-label matches the gold answer."""
    pairs = [[r.label, gold[pid]] for r, pid in zip(results, prompt_ids)
             if r.label is not None and gold.get(pid) is not None]
    if not pairs:
        return None
    same = [c[0] is not None and c[0] == c[1] for c in grader.group_many(pairs)]
    return sum(same) / len(same)
