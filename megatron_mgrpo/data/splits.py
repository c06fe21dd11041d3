"""Disjoint data splits: RL prompts, warm-start prompts and evaluation prompts.

A question belongs to a split because of its text, never because of a seed: its normalised text
is hashed to a position in [0, 1), and fixed intervals of that line are the splits. So no seed,
size or task choice can put one question in two splits (two builtin tasks that generate the same
question put it in the same split), and the same question lands in the same split on every
machine. Seeds only choose which questions of a split a run draws.

    builtin tasks   [0, 0.1) eval, [0.1, 0.55) warm start, [0.55, 1) RL
    dataset files   [0, eval.holdout_fraction) eval, the rest RL (unless eval.path names the eval data)

Builtin tasks are generated, de-duplicated by question and split; a split too small for the size
asked is an error that names the sizes. Whatever the sources, `build_splits` counts the pairwise
overlap by question and refuses one (eval overlapping RL only with eval.allow_overlap, as test-time
RL does on purpose). `SplitReport` is what summary.json records: sizes, overlaps, and a fingerprint
of each split's questions, so two runs can be checked to have used the same data.
"""

from __future__ import annotations

import hashlib
import itertools
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

from megatron_mgrpo.data.records import DataError, PromptRecord

SPLITS = ("rl", "warmstart", "eval")
#: the interval of the hash line that is each split of a builtin task
BUILTIN_INTERVALS = {"eval": (0.0, 0.1), "warmstart": (0.1, 0.55), "rl": (0.55, 1.0)}
#: items generated per question asked before a builtin split counts as exhausted
MAX_DRAWS_PER_QUESTION = 60


def normalize_question(text: str) -> str:
    """The form questions are compared in: Unicode NFKC, case-folded, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def question_key(text: str) -> str:
    """A stable hash of the normalised question (hex SHA-256)."""
    return hashlib.sha256(normalize_question(text).encode()).hexdigest()


def hash_position(text: str) -> float:
    """Where the question falls on the hash line [0, 1)."""
    return int(question_key(text)[:16], 16) / 2**64


def in_interval(text: str, interval: tuple[float, float]) -> bool:
    low, high = interval
    return low <= hash_position(text) < high


def fingerprint(records: Iterable[PromptRecord]) -> str:
    """A hash of a split's set of questions (order and duplicates do not matter)."""
    keys = sorted({question_key(r.question) for r in records})
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]


def overlap(a: Iterable[PromptRecord], b: Iterable[PromptRecord]) -> int:
    """How many distinct questions of `a` are also in `b`."""
    return len({question_key(r.question) for r in a} & {question_key(r.question) for r in b})


def builtin_split(task: str, split: str, size: int, seed: int) -> list[PromptRecord]:
    """`size` distinct questions of builtin `task` in `split`, in generation order of `seed`."""
    from megatron_mgrpo.data.synthetic import synthetic_stream

    if split not in BUILTIN_INTERVALS:
        raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    interval, chosen, seen, draws = BUILTIN_INTERVALS[split], [], set(), 0
    limit = MAX_DRAWS_PER_QUESTION * size
    for draws, record in enumerate(synthetic_stream(task, seed, limit), 1):  # noqa: B007 (read after the loop)
        key = question_key(record.question)
        if key in seen or not in_interval(record.question, interval):
            continue
        seen.add(key)
        chosen.append(record)
        if len(chosen) == size:
            return chosen
    knob = {"rl": "data.builtin_size", "warmstart": "warmstart.size", "eval": "eval.prompts"}[split]
    raise DataError(f"builtin:{task} yielded only {len(chosen)} distinct questions for its {split} split in {draws} "
                    f"draws, fewer than {knob}={size}: lower {knob} or use a task with more questions")


@dataclass
class Splits:
    """The prompts of one run, by split, and where each came from."""

    rl: list[PromptRecord]
    warmstart: list[PromptRecord]
    eval: list[PromptRecord]
    sources: dict[str, str]

    def report(self) -> dict:
        """Sizes, pairwise overlap by question, and fingerprints: what summary.json records."""
        parts = {name: getattr(self, name) for name in SPLITS}
        return {"sizes": {name: len(records) for name, records in parts.items()},
                "overlap": {f"{a}-{b}": overlap(parts[a], parts[b]) for a, b in itertools.combinations(SPLITS, 2)},
                "fingerprints": {name: fingerprint(records) for name, records in parts.items()},
                "sources": self.sources}


def build_splits(cfg) -> Splits:
    """The RL, warm-start and evaluation prompts a config describes, checked to be disjoint.

    RL: `data.path` (its RL split: the builtin interval, or a file less its held-out part). Warm
    start: the warm-start split of `warmstart.task` (when warmstart.steps > 0). Evaluation:
    `eval.path` when set (a file, or builtin:<task>'s eval split), else held out of data.path."""
    from megatron_mgrpo.data.datasets import load_prompts_from_config

    data, evaluation = cfg.data, cfg.eval
    builtin = data.path.startswith("builtin:")
    rl = load_prompts_from_config(data, split="rl").records
    eval_records, eval_source = [], ""
    if evaluation.prompts:
        if evaluation.path:
            eval_records = _eval_file_or_task(cfg)
            eval_source = evaluation.path
        elif builtin:
            eval_records = builtin_split(data.path.split(":", 1)[1], "eval", evaluation.prompts, data.seed)
            eval_source = f"{data.path} (eval split)"
        else:
            held_out = (0.0, evaluation.holdout_fraction)
            eval_records = [r for r in rl if in_interval(r.question, held_out) and r.gold_answer is not None]
            rl = [r for r in rl if not in_interval(r.question, held_out)]
            eval_source = f"{data.path} (held out: hash < {evaluation.holdout_fraction:g})"
            if not rl:
                raise DataError(f"data.path={data.path!r}: every question fell in the held-out part; lower "
                                f"eval.holdout_fraction={evaluation.holdout_fraction:g} or set eval.path")
        eval_records = eval_records[:evaluation.prompts]
        if not eval_records:
            raise DataError(f"{eval_source} holds no question with a gold answer for true accuracy: set eval.path "
                            f"to a file with answers, or eval.prompts=0")
    warm = []
    if cfg.warmstart.steps:
        task = cfg.warmstart.task
        if not task.startswith("builtin:"):
            raise DataError(f"warmstart.task={task!r} must be a builtin:<task>: the warm start trains on gold "
                            f"answers, so it never reads the RL dataset")
        warm = builtin_split(task.split(":", 1)[1], "warmstart", cfg.warmstart.size, data.seed)
    splits = Splits(rl, warm, eval_records, {"rl": f"{data.path} (rl split)" if builtin else data.path,
                                            "warmstart": f"{cfg.warmstart.task} (warmstart split)" if warm else "",
                                            "eval": eval_source})
    _refuse_overlap(splits, evaluation.allow_overlap)
    return splits


def _eval_file_or_task(cfg) -> list[PromptRecord]:
    from megatron_mgrpo.data.datasets import load_prompts_from_config

    path = cfg.eval.path
    if path.startswith("builtin:"):
        return builtin_split(path.split(":", 1)[1], "eval", cfg.eval.prompts, cfg.data.seed)
    records = load_prompts_from_config(type(cfg.data)(path=path, format="auto", fields=cfg.data.fields,
                                                      on_bad_row=cfg.data.on_bad_row)).records
    return [r for r in records if r.gold_answer is not None]


def _refuse_overlap(splits: Splits, allow_eval_overlap: bool) -> None:
    shared_warm = overlap(splits.rl, splits.warmstart)
    if shared_warm:
        raise DataError(f"{shared_warm} questions of data.path={splits.sources['rl']!r} are in the warm start's "
                        f"split of {splits.sources['warmstart']!r}: the warm start would train on gold answers of RL "
                        f"prompts; remove them from the data or set warmstart.steps=0")
    shared_eval = overlap(splits.eval, splits.rl)
    if shared_eval and not allow_eval_overlap:
        raise DataError(f"eval.path={splits.sources['eval']!r} shares {shared_eval} of its {len(splits.eval)} "
                        f"questions with the RL data: true accuracy would be measured on training questions; use "
                        f"disjoint files, or eval.allow_overlap=true for test-time RL on purpose")
    shared = overlap(splits.eval, splits.warmstart)
    if shared:
        raise DataError(f"{shared} evaluation questions of {splits.sources['eval']!r} are in the warm start's "
                        f"split: set eval.path to other questions")
