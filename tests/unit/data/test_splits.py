"""Splits by question text: RL, warm-start and evaluation prompts never share a question."""

import json

import pytest

from megatron_mgrpo.config import load_config
from megatron_mgrpo.data import DataError, PromptRecord
from megatron_mgrpo.data.splits import (
    BUILTIN_INTERVALS,
    build_splits,
    builtin_split,
    fingerprint,
    hash_position,
    normalize_question,
    overlap,
    question_key,
)
from megatron_mgrpo.data.synthetic import TASKS
from megatron_mgrpo.run import EMBEDDED_PRESET


def records(*questions, answer="1"):
    return [PromptRecord(f"q{i}", q, answer) for i, q in enumerate(questions)]


def write_jsonl(path, questions):
    path.write_text("".join(json.dumps({"id": f"r{i}", "question": q, "answer": str(i)}) + "\n"
                            for i, q in enumerate(questions)))
    return path


def test_questions_are_compared_by_normalised_text():
    assert normalize_question("  What is\n 2 +  2?\u00a0") == "what is 2 + 2?"
    assert question_key("What is 2 + 2?") == question_key("what  is 2 + 2? ")
    assert question_key("What is 2 + 2?") != question_key("What is 2 + 3?")
    assert 0.0 <= hash_position("anything") < 1.0
    assert overlap(records("A b", "c"), records("a  B", "d")) == 1
    assert fingerprint(records("x", "y")) == fingerprint(records("y", "x", "x")) != fingerprint(records("x"))


@pytest.mark.slow
@pytest.mark.parametrize("task", sorted(TASKS))
def test_builtin_splits_are_disjoint_at_default_sizes_for_two_seeds(task):
    cfg = load_config(EMBEDDED_PRESET, [f"data.path=builtin:{task}", f"warmstart.task=builtin:{task}"])
    seen = {}
    for seed in (0, 1):
        splits = build_splits(load_config(EMBEDDED_PRESET, [f"data.path=builtin:{task}",
                                                            f"warmstart.task=builtin:{task}", f"data.seed={seed}"]))
        report = splits.report()
        assert report["sizes"] == {"rl": cfg.data.builtin_size, "warmstart": cfg.warmstart.size,
                                   "eval": cfg.eval.prompts}
        assert report["overlap"] == {"rl-warmstart": 0, "rl-eval": 0, "warmstart-eval": 0}
        for name in ("rl", "warmstart", "eval"):  # distinct questions, each in its split's interval
            split = getattr(splits, name)
            assert len({question_key(r.question) for r in split}) == len(split)
            low, high = BUILTIN_INTERVALS[name]
            assert all(low <= hash_position(r.question) < high for r in split)
            seen.setdefault(name, []).append(split)
    for name, other in (("rl", "warmstart"), ("rl", "eval"), ("warmstart", "eval")):  # also across seeds
        assert overlap(seen[name][0], seen[other][1]) == overlap(seen[name][1], seen[other][0]) == 0


@pytest.mark.slow
def test_the_same_config_gives_the_same_questions():
    """The default data are pinned by fingerprint: a changed generator (a reasoning-gym release
    that builds other questions) fails here instead of silently changing every result."""
    report = build_splits(load_config(EMBEDDED_PRESET)).report()
    assert report["fingerprints"] == build_splits(load_config(EMBEDDED_PRESET)).report()["fingerprints"]
    assert report["fingerprints"] == {"rl": "843e831f52f00dd6", "warmstart": "970d46d43e0829a4",
                                      "eval": "0329799676d5e187"}


@pytest.mark.slow
def test_a_split_too_small_for_the_size_asked_is_a_clear_error():
    with pytest.raises(DataError, match=r"builtin:small_sums yielded only \d+ distinct questions for its eval "
                                        r"split .* fewer than eval.prompts=5000: lower eval.prompts"):
        builtin_split("small_sums", "eval", 5000, seed=0)


def test_a_file_holds_out_its_eval_part_by_question_hash(tmp_path):
    questions = [f"What is {i} times {i + 3}?" for i in range(400)]
    path = write_jsonl(tmp_path / "train.jsonl", questions)
    cfg = load_config(overrides=[f"data.path={path}", "eval.prompts=1000", "eval.holdout_fraction=0.25"])
    splits = build_splits(cfg)
    held = [q for q in questions if hash_position(q) < 0.25]
    assert [r.question for r in splits.eval] == held and 60 < len(held) < 140
    assert len(splits.rl) == 400 - len(held) and overlap(splits.rl, splits.eval) == 0 and splits.warmstart == []
    assert build_splits(load_config(overrides=[f"data.path={path}", "eval.prompts=0"])).rl.__len__() == 400


def test_an_eval_file_sharing_questions_with_the_rl_data_is_refused_unless_allowed(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [f"q {i}" for i in range(50)])
    test = write_jsonl(tmp_path / "test.jsonl", ["Q  3", "q 7", "q 100"])  # two shared, by normalised text
    overrides = [f"data.path={train}", f"eval.path={test}"]
    with pytest.raises(DataError, match=r"eval.path=.*test.jsonl' shares 2 of its 3 questions with the RL data"):
        build_splits(load_config(overrides=overrides))
    splits = build_splits(load_config(overrides=overrides + ["eval.allow_overlap=true"]))
    assert splits.report()["overlap"]["rl-eval"] == 2 and len(splits.rl) == 50 and len(splits.eval) == 3
    disjoint = write_jsonl(tmp_path / "other.jsonl", ["q 100", "q 101"])
    assert build_splits(load_config(overrides=[f"data.path={train}", f"eval.path={disjoint}"])).report()[
        "overlap"] == {"rl-warmstart": 0, "rl-eval": 0, "warmstart-eval": 0}


def test_rl_data_holding_warm_start_questions_is_refused(tmp_path):
    warm = builtin_split("small_sums", "warmstart", 3, seed=0)
    path = write_jsonl(tmp_path / "train.jsonl", [r.question for r in warm] + ["another question"])
    overrides = [f"data.path={path}", "eval.prompts=0", "warmstart.steps=10", "warmstart.size=4000"]
    with pytest.raises(DataError, match="3 questions of data.path=.* are in the warm start's split"):
        build_splits(load_config(overrides=overrides))
    assert len(build_splits(load_config(overrides=overrides[:2])).rl) == 4  # no warm start, nothing refused


def test_eval_path_may_name_a_builtin_task():
    splits = build_splits(load_config(overrides=["data.path=builtin:chain_sum", "data.builtin_size=50",
                                                 "eval.path=builtin:small_sums", "eval.prompts=20"]))
    assert len(splits.eval) == 20 and all(hash_position(r.question) < 0.1 for r in splits.eval)
    assert splits.report()["sources"]["eval"] == "builtin:small_sums"
