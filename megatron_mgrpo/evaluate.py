"""`mgrpo eval`: pass@1 and maj@k of a model on local datasets, graded exactly as in training.

For each prompt the model samples k responses; each response's answer is extracted with
`answer_format` and compared with the gold answer by the training grader (`AnswerGrader`:
canonical forms, then math-verify), so an answer that earns reward in training is correct here
and vice versa.

    pass@1   mean over prompts of (correct samples / k): the expected single-sample accuracy
    maj@k    fraction of prompts whose majority answer (training's vote and tie rule) is correct
    unparseable  samples with no extractable answer (they count as wrong and do not vote)
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_mgrpo.answer_format import extract_answer
from megatron_mgrpo.data.records import DataError, PromptRecord
from megatron_mgrpo.data.templates import PromptTemplate
from megatron_mgrpo.reward.equivalence import AnswerGrader
from megatron_mgrpo.reward.voting import vote
from megatron_mgrpo.rollout.types import RolloutEngine, SamplingParams

# A plain-text prompt is a list of "Question: ... Answer: ..." blocks; a model that goes on to
# write the next question would also box that question's answer, which would then be graded.
PLAIN_STOP = ("\nQuestion:",)


@dataclass
class EvalResult:
    """Scores of one dataset. `skipped_no_gold`: prompts without a gold answer, not evaluated."""

    dataset: str
    prompts: int
    k: int
    pass_at_1: float
    maj_at_k: float
    correct_samples: int
    unparseable: int
    skipped_no_gold: int


@dataclass(frozen=True)
class PromptScore:
    correct: int
    majority_correct: bool
    unparseable: int


def gold_of(record: PromptRecord) -> str | None:
    """The gold answer: the answer field, else the last \\boxed{} of the worked solution."""
    if record.gold_answer is not None:
        return record.gold_answer
    return extract_answer(record.solution) if record.solution else None


def grade_prompts(answers: Sequence[Sequence[str | None]], golds: Sequence[str],
                  grader: AnswerGrader) -> list[PromptScore]:
    """Score each prompt's extracted answers against its gold answer, in one batched grading call.

    Gold and answers are grouped together, so "correct" means "in the gold answer's class", the
    same test that rewards a response under label_source=gt; the majority is training's vote
    over the answers alone.
    """
    pools = [[gold, *prompt_answers] for gold, prompt_answers in zip(golds, answers)]
    scores = []
    for prompt_answers, classes in zip(answers, grader.group_many(pools)):
        gold_class, answer_classes = classes[0], classes[1:]
        majority = vote(list(prompt_answers), grader, classes=answer_classes)
        scores.append(PromptScore(
            correct=sum(gold_class is not None and c == gold_class for c in answer_classes),
            majority_correct=gold_class is not None and majority.winner == gold_class,
            unparseable=majority.n_unparseable))
    return scores


def evaluate_records(name: str, records: Sequence[PromptRecord], engine: RolloutEngine, template: PromptTemplate,
                     sampling: SamplingParams, k: int, grader: AnswerGrader, extraction: str = "strict",
                     batch_prompts: int = 32, progress=None) -> EvalResult:
    """Sample k responses per prompt with `engine` and score them; `progress` is a rich Progress."""
    graded = [(r, gold) for r in records if (gold := gold_of(r)) is not None]
    if not graded:
        raise DataError(f"dataset {name!r} has no prompt with a gold answer (answer column, or a \\boxed{{}} in "
                        f"the solution): evaluation needs gold answers")
    task = progress.add_task(name, total=len(graded)) if progress is not None else None
    scores: list[PromptScore] = []
    for start in range(0, len(graded), batch_prompts):
        batch = graded[start:start + batch_prompts]
        samples = engine.generate([template.encode(r) for r, _ in batch], k, sampling)
        answers = [[extract_answer(s.text, extraction) for s in samples[i * k:(i + 1) * k]] for i in range(len(batch))]
        scores += grade_prompts(answers, [gold for _, gold in batch], grader)
        if progress is not None:
            progress.advance(task, len(batch))
    correct = sum(s.correct for s in scores)
    return EvalResult(dataset=name, prompts=len(scores), k=k, pass_at_1=correct / (k * len(scores)),
                      maj_at_k=sum(s.majority_correct for s in scores) / len(scores), correct_samples=correct,
                      unparseable=sum(s.unparseable for s in scores), skipped_no_gold=len(records) - len(graded))


def load_eval_data(path: str, builtin_size: int, seed: int) -> list[PromptRecord]:
    """Prompts of a dataset file / directory, or the evaluation split of `builtin:<task>`
    (questions no training run of that task trains or warm-starts on)."""
    from megatron_mgrpo.config import DataConfig
    from megatron_mgrpo.data.datasets import load_prompts_from_config

    return load_prompts_from_config(DataConfig(path=path, builtin_size=builtin_size, seed=seed), split="eval").records


def results_table(results: Sequence[EvalResult], model: str):
    from rich.table import Table

    table = Table(title=f"Evaluation of {model}")
    for column in ("dataset", "prompts", "k", "pass@1", "maj@k", "unparseable"):
        table.add_column(column, justify="left" if column == "dataset" else "right")
    for r in results:
        table.add_row(r.dataset, str(r.prompts), str(r.k), f"{r.pass_at_1:.3f}", f"{r.maj_at_k:.3f}",
                      f"{r.unparseable} / {r.prompts * r.k}")
    return table


def run_eval(model: str, data: Sequence[str], *, k: int = 8, temperature: float = 0.6, max_new_tokens: int = 512,
             template: str = "auto", few_shot: int = 0, seed: int = 0, builtin_size: int = 200,
             extraction: str = "strict", verify_workers: int = 1, out: str | Path | None = None,
             console=None) -> list[EvalResult]:
    """Evaluate `model` (an HF directory or builtin:<name>) on each dataset; print a table, write JSON."""
    from rich.console import Console
    from rich.progress import Progress

    from megatron_mgrpo.models.builtin import resolve_model_path
    from megatron_mgrpo.rollout.hf_engine import HFEngine

    console = console or Console()
    sampling = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
    engine = HFEngine.from_pretrained(resolve_model_path(model), seed=seed)
    results = []
    try:
        with AnswerGrader(num_workers=verify_workers) as grader, Progress(console=console, transient=True) as bar:
            for path in data:
                records = load_eval_data(path, builtin_size, seed)
                prompt_template = PromptTemplate(engine.tokenizer, template, few_shot, records, seed)
                stop = () if prompt_template.chat else PLAIN_STOP
                results.append(evaluate_records(path, records, engine, prompt_template,
                                                dataclasses.replace(sampling, stop=stop), k, grader, extraction,
                                                progress=bar))
    finally:
        engine.shutdown()
    console.print(results_table(results, model))
    if out is not None:
        write_results(out, model, results, {"k": k, "temperature": temperature, "max_new_tokens": max_new_tokens,
                                            "template": template, "few_shot": few_shot, "seed": seed})
    return results


def write_results(path: str | Path, model: str, results: Sequence[EvalResult], settings: dict[str, Any]) -> None:
    """The results as one JSON object, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    payload = {"model": model, "settings": settings, "datasets": [dataclasses.asdict(r) for r in results]}
    staging.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    os.replace(staging, path)
