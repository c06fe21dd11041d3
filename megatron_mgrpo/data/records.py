"""What a prompt is, where its fields come from, and what a bad row looks like."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PromptRecord:
    """One prompt. `gold_answer` is for monitoring (and label_source=gt) only."""

    id: str
    question: str
    gold_answer: str | None = None
    solution: str | None = None


@dataclass(frozen=True)
class FieldMap:
    """Which input column holds which field (`data.fields.*`); id and answers are optional."""

    id: str = "id"
    question: str = "question"
    answer: str = "answer"
    solution: str = "solution"


@dataclass(frozen=True)
class BadRow:
    """A row that could not be used: where it is, what is wrong, and how to fix it."""

    file: str
    line: int
    reason: str
    detail: str = ""
    fix: str = ""

    def __str__(self) -> str:
        text = f"{self.file}:{self.line}: {self.reason}"
        text += f" ({self.detail})" if self.detail else ""
        return text + (f"; {self.fix}" if self.fix else "")


class DataError(ValueError):
    """A dataset that cannot be read, or a bad row under data.on_bad_row=error."""
