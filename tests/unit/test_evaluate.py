"""`mgrpo eval`: pass@1 over k samples and maj@k, graded by the training grader."""

import json

import pytest

from megatron_mgrpo.cli import main
from megatron_mgrpo.data.records import DataError, PromptRecord
from megatron_mgrpo.data.templates import PromptTemplate
from megatron_mgrpo.evaluate import PLAIN_STOP, evaluate_records, gold_of, grade_prompts, run_eval
from megatron_mgrpo.models.builtin import build_tokenizer
from megatron_mgrpo.reward.equivalence import AnswerGrader
from megatron_mgrpo.rollout.hf_engine import HFEngine
from megatron_mgrpo.rollout.types import Sample, SamplingParams


@pytest.fixture(scope="module")
def grader():
    with AnswerGrader(num_workers=0) as grader:
        yield grader


class ScriptedEngine:
    """Answers each prompt with the given texts, in turn; records what it was asked."""

    def __init__(self, tokenizer, texts_by_question):
        self.tokenizer, self.texts_by_question = tokenizer, texts_by_question
        self.calls, self.stops = [], []

    def generate(self, prompts, n, sampling):
        self.calls.append((len(prompts), n))
        self.stops.append(sampling.stop)
        samples = []
        for index, prompt in enumerate(prompts):
            text = self.tokenizer.decode(prompt)
            texts = next(t for q, t in self.texts_by_question.items() if f"{q}\n" in text)
            samples += [Sample(index, list(prompt), [], texts[i % len(texts)], [], "stop", 0) for i in range(n)]
        return samples

    def shutdown(self):
        pass


def evaluate(records, texts, grader, k=4, **kwargs):
    tokenizer = build_tokenizer()
    engine = ScriptedEngine(tokenizer, texts)
    template = PromptTemplate(tokenizer, "plain")
    result = evaluate_records("toy", records, engine, template, SamplingParams(), k, grader, **kwargs)
    return result, engine


RECORDS = [PromptRecord("a", "1+1", "2"), PromptRecord("b", "2+3", "5"), PromptRecord("c", "half of 1", "1/2")]


def test_a_model_that_always_answers_gold_scores_one(grader):
    texts = {"1+1": ["\\boxed{2}"], "2+3": ["so \\boxed{5}"], "half of 1": ["\\boxed{0.5}", "\\boxed{\\frac{1}{2}}"]}
    result, _ = evaluate(RECORDS, texts, grader)
    assert (result.prompts, result.pass_at_1, result.maj_at_k, result.unparseable) == (3, 1.0, 1.0, 0)
    assert result.correct_samples == 12


def test_pass_at_1_averages_samples_and_maj_at_k_follows_the_vote(grader):
    texts = {"1+1": ["\\boxed{2}", "\\boxed{3}", "\\boxed{3}", "no box"],  # 1/4 right, majority wrong
             "2+3": ["\\boxed{5}", "\\boxed{5}", "\\boxed{4}", "\\boxed{5}"],  # 3/4 right, majority right
             "half of 1": ["nothing", "still nothing"]}  # nothing parses: wrong, no vote
    result, engine = evaluate(RECORDS, texts, grader, batch_prompts=2)
    assert result.pass_at_1 == pytest.approx((1 + 3 + 0) / 12)
    assert result.maj_at_k == pytest.approx(1 / 3)
    assert result.correct_samples == 4 and result.unparseable == 5
    assert engine.calls == [(2, 4), (1, 4)]  # prompts go to the engine in batches, k samples each


def test_majority_ties_follow_the_training_vote(grader):
    [score] = grade_prompts([["3", "2"]], ["2"], grader)  # tie: the smaller representative wins
    assert score.correct == 1 and score.majority_correct
    [score] = grade_prompts([["3", "3", None, None]], ["3"], grader)
    assert (score.correct, score.majority_correct, score.unparseable) == (2, True, 2)


def test_prompts_without_gold_are_skipped_and_counted(grader):
    records = [*RECORDS[:1], PromptRecord("d", "9+9"), PromptRecord("e", "4+4", solution="so \\boxed{8}")]
    result, _ = evaluate(records, {"1+1": ["\\boxed{2}"], "4+4": ["\\boxed{8}"]}, grader)
    assert (result.prompts, result.skipped_no_gold, result.pass_at_1) == (2, 1, 1.0)
    assert gold_of(records[2]) == "8"
    with pytest.raises(DataError, match="no prompt with a gold answer"):
        evaluate(records[1:2], {}, grader)


@pytest.mark.parametrize("template, stop", [("plain", PLAIN_STOP), ("chat", ())])
def test_plain_prompts_stop_before_the_model_writes_the_next_question(template, stop, tmp_path, monkeypatch):
    engine = ScriptedEngine(build_tokenizer(), {"1+1": ["\\boxed{2}"]})
    monkeypatch.setattr("megatron_mgrpo.models.builtin.resolve_model_path", lambda path: path)
    monkeypatch.setattr(HFEngine, "from_pretrained", lambda path, seed: engine)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "1+1", "answer": "2"}) + "\n")
    [result] = run_eval("fake", [str(data)], k=2, template=template, verify_workers=0)
    assert engine.stops == [stop] and result.pass_at_1 == 1.0


@pytest.mark.slow
def test_cli_evaluates_the_builtin_model_on_files(tmp_path, monkeypatch):
    monkeypatch.setenv("MGRPO_CACHE", str(tmp_path / "cache"))
    rows = [{"id": str(i), "question": f"{i}+1", "answer": str(i + 1)} for i in range(3)]
    first, second = tmp_path / "sums.jsonl", tmp_path / "more.jsonl"
    first.write_text("".join(json.dumps(r) + "\n" for r in rows))
    second.write_text(json.dumps({"question": "1+1", "solution": "\\boxed{2}"}) + "\n")
    out = tmp_path / "results" / "eval.json"
    code = main(["eval", "--model", "builtin:tiny-qwen3", "--data", str(first), "--data", str(second), "--k", "3",
                 "--max-new-tokens", "6", "--verify-workers", "0", "--out", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["settings"]["k"] == 3
    assert [d["dataset"] for d in report["datasets"]] == [str(first), str(second)]
    for scores, prompts in zip(report["datasets"], (3, 1)):
        assert scores["prompts"] == prompts and scores["k"] == 3
        assert scores["correct_samples"] == pytest.approx(scores["pass_at_1"] * prompts * 3)
        assert 0 <= scores["maj_at_k"] <= 1 and 0 <= scores["unparseable"] <= prompts * 3


def test_cli_rejects_a_model_path_that_is_no_model(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "1+1", "answer": "2"}) + "\n")
    assert main(["eval", "--model", str(tmp_path), "--data", str(data), "--out", str(tmp_path / "o.json")]) == 2
    assert "no config.json" in capsys.readouterr().err
