"""`mgrpo preprocess`: local MATH / MATH-500 / AIME / GPQA-style files -> prompt jsonl.

Output rows are {"id", "question", "answer", "solution"}. Columns are found by the input's
style (case-insensitive) unless a FieldMap names them. When there is no answer column the gold
answer is the solution's last \\boxed{}; a row with no answer at all is a bad row. GPQA rows
become multiple-choice questions with options shuffled per row (seeded) and the correct letter
as the answer. The output is written to a temporary file and renamed, so an interrupted run
never leaves a half-written dataset behind.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_mgrpo.answer_format import extract_answer
from megatron_mgrpo.data.datasets import iter_rows
from megatron_mgrpo.data.records import BadRow, DataError, FieldMap

STYLES = {  # field -> candidate columns, first match wins (case-insensitive)
    "math": {"id": ["unique_id", "id"], "question": ["problem"], "answer": ["answer"], "solution": ["solution"]},
    "aime": {"id": ["id", "url"], "question": ["problem", "question"], "answer": ["answer"], "solution": ["solution"]},
    "generic": {"id": ["id", "unique_id"], "question": ["question", "problem", "prompt"],
                "answer": ["answer", "final_answer", "gold"], "solution": ["solution", "rationale"]},
}
GPQA_COLUMNS = ["question", "correct answer", "incorrect answer 1", "incorrect answer 2", "incorrect answer 3"]


@dataclass
class PreprocessReport:
    output: str
    written: int = 0
    bad_rows: list[BadRow] = field(default_factory=list)

    def summary(self) -> str:
        text = f"wrote {self.written} prompts to {self.output}"
        if self.bad_rows:
            counts = ", ".join(f"{n} {reason}" for reason, n in Counter(b.reason for b in self.bad_rows).items())
            text += f"; skipped {len(self.bad_rows)} bad rows ({counts}); first: {self.bad_rows[0]}"
        return text


def preprocess_file(input: str | Path, output: str | Path, style: str = "auto", fields: FieldMap | None = None,
                    on_bad_row: str = "skip", seed: int = 0) -> PreprocessReport:
    if style not in ("auto", "gpqa", *STYLES):
        raise DataError(f"style={style!r} is not one of auto, math, aime, gpqa, generic")
    output = Path(output)
    report = PreprocessReport(str(output))
    partial = output.with_name(output.name + ".partial")
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(partial, "w", encoding="utf-8") as out:
            for line, row in iter_rows(input):
                item = row if isinstance(row, BadRow) else _convert(row, str(input), line, style, fields, seed)
                if isinstance(item, BadRow):
                    if on_bad_row == "error":
                        raise DataError(str(item))
                    report.bad_rows.append(item)
                    continue
                out.write(json.dumps(item, ensure_ascii=False) + "\n")
                report.written += 1
        if not report.written:
            raise DataError(_nothing_written(input, report.bad_rows))
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, output)
    return report


def _nothing_written(input: str | Path, bad_rows: list[BadRow]) -> str:
    """Why a conversion produced no prompt: an empty prompt file would only fail later, in training."""
    if not bad_rows:
        return f"no prompts written: {str(input)!r} has no rows; point --input at a file with data"
    counts = ", ".join(f"{n} {reason}" for reason, n in Counter(b.reason for b in bad_rows).items())
    return (f"no prompts written: all {len(bad_rows)} rows of {str(input)!r} are bad ({counts}); first: "
            f"{bad_rows[0]}")


def _convert(row: dict[str, Any], file: str, line: int, style: str, fields: FieldMap | None,
             seed: int) -> dict | BadRow:
    lower = {str(k).lower(): k for k in row}
    if fields is None and (style == "gpqa" or (style == "auto" and all(c in lower for c in GPQA_COLUMNS))):
        return _gpqa(row, lower, file, line, seed)
    if fields is not None:
        columns = {name: getattr(fields, name) for name in ("id", "question", "answer", "solution")}
    else:
        candidates = STYLES["generic" if style == "auto" else style]
        columns = {name: next((lower[c] for c in options if c in lower), None) for name, options in candidates.items()}
    question = row.get(columns["question"]) if columns["question"] is not None else None
    if not isinstance(question, str) or not question.strip():
        return BadRow(file, line, "missing question", f"columns: {', '.join(map(str, row))}",
                      "pass --question-field <column> or the right --style")
    solution = row.get(columns["solution"]) if columns["solution"] is not None else None
    answer = row.get(columns["answer"]) if columns["answer"] is not None else None
    if answer is None or str(answer).strip() == "":
        answer = extract_answer(str(solution)) if solution else None
    if answer is None:
        return BadRow(file, line, "no answer", "no answer column and no \\boxed{} in the solution",
                      "pass --answer-field <column>")
    record_id = row.get(columns["id"]) if columns["id"] is not None else None
    return {"id": str(record_id) if record_id is not None else f"{Path(file).stem}-{line}", "question": question,
            "answer": str(answer).strip(), "solution": None if solution is None else str(solution)}


def _gpqa(row, lower, file, line, seed) -> dict | BadRow:
    values = [row[lower[c]] for c in GPQA_COLUMNS]
    if any(not isinstance(v, str) or not v.strip() for v in values):
        return BadRow(file, line, "incomplete multiple-choice row", "", "every option must be non-empty text")
    question, correct, *wrong = [v.strip() for v in values]
    options = [correct, *wrong]
    random.Random(f"{seed}:{line}").shuffle(options)
    letters = "ABCD"
    body = "\n".join(f"({letter}) {option}" for letter, option in zip(letters, options))
    id_column = lower.get("record id", lower.get("id"))
    record_id = row.get(id_column) if id_column is not None else None
    return {"id": str(record_id) if record_id else f"{Path(file).stem}-{line}",
            "question": f"{question}\n\n{body}\n\nAnswer with the letter of the correct option.",
            "answer": letters[options.index(correct)], "solution": None}
