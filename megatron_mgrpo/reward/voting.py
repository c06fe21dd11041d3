"""Majority vote over a pool of extracted answers -> pseudo-label."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_mgrpo.reward.equivalence import AnswerGrader, canonical_form


@dataclass
class Vote:
    """The outcome of one prompt's vote.

    label: the winning answer (its class's representative), or None when nobody voted or the
    winner's share is below the threshold; share: winner size / number of voters (answers that
    could be extracted); class_sizes: sizes of all classes, largest first; classes: the class id
    of every input answer (None for no answer); winner: the winning class id (even when its
    share is below the threshold, for monitoring).
    """

    label: str | None
    share: float
    class_sizes: list[int]
    n_voters: int
    n_unparseable: int
    classes: list[int | None]
    winner: int | None


def vote(answers: list[str | None], grader: AnswerGrader, threshold: float = 0.0,
         classes: list[int | None] | None = None) -> Vote:
    """Majority vote; unparseable answers (None) do not vote.

    Tie rule (deterministic and independent of the order of the answers): each class is
    represented by the smallest canonical form among its members, and among the largest
    classes the one with the smallest representative wins. Pass `classes` when the grouping was
    already computed (e.g. in one batched `group_many` call).
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"reward.vote_threshold={threshold} must be in [0, 1]")
    classes = grader.group_answers(answers) if classes is None else classes
    if len(classes) != len(answers):
        raise ValueError(f"vote got {len(classes)} class ids for {len(answers)} answers: pass the grouping "
                         f"of exactly these answers (grader.group_answers(answers))")
    members: dict[int, list[str]] = {}
    for answer, cls in zip(answers, classes):
        if cls is not None:
            members.setdefault(cls, []).append(canonical_form(answer))
    n_voters = sum(len(m) for m in members.values())
    n_unparseable = len(answers) - n_voters
    if not members:
        return Vote(None, 0.0, [], 0, n_unparseable, classes, None)
    representative = {cls: min(forms) for cls, forms in members.items()}
    winner = min(members, key=lambda cls: (-len(members[cls]), representative[cls]))
    share = len(members[winner]) / n_voters
    label = representative[winner] if share >= threshold else None
    sizes = sorted((len(m) for m in members.values()), reverse=True)
    return Vote(label, share, sizes, n_voters, n_unparseable, classes, winner)
