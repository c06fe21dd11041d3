"""Prompt datasets from jsonl, parquet or Hugging Face `datasets` directories.

Rows stream from disk; each becomes a `PromptRecord` or a `BadRow` that names its file and line
(row number for parquet / datasets directories). With on_bad_row=skip bad rows are counted and
summarised; with on_bad_row=error the first one stops the run with the fix in the message.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_mgrpo.config import DATA_FORMATS
from megatron_mgrpo.data.records import BadRow, DataError, FieldMap, PromptRecord

log = logging.getLogger(__name__)


@dataclass
class PromptSet:
    records: list[PromptRecord]
    bad_rows: list[BadRow] = field(default_factory=list)

    def bad_row_counts(self) -> Counter:
        return Counter(b.reason for b in self.bad_rows)


def detect_format(path: Path, fmt: str = "auto") -> str:
    if fmt not in DATA_FORMATS:
        raise DataError(f"data.format={fmt!r} is not one of {', '.join(DATA_FORMATS)}")
    if not path.exists():
        raise DataError(f"data.path={str(path)!r} does not exist: point it at a jsonl / parquet file or a "
                        f"datasets directory, or use builtin:<task>")
    if fmt != "auto":
        return fmt
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return "hf"
    elif path.suffix in (".jsonl", ".json"):
        return "jsonl"
    elif path.suffix == ".parquet":
        return "parquet"
    raise DataError(f"cannot tell the format of data.path={str(path)!r}: use a .jsonl / .parquet file or a "
                    f"directory written by datasets' save_to_disk, or set data.format")


def iter_rows(path: str | Path, fmt: str = "auto") -> Iterator[tuple[int, dict[str, Any] | BadRow]]:
    """(line or row number, row dict) pairs; unreadable rows come as `BadRow`s."""
    path = Path(path)
    fmt = detect_format(path, fmt)
    if fmt == "jsonl":
        with open(path, "rb") as handle:  # bytes: a line that is not UTF-8 is then a bad row with its number
            for line_no, raw in enumerate(handle, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    yield line_no, BadRow(str(path), line_no, "not UTF-8", f"byte {err.start + 1} of the line",
                                          "save the file as UTF-8")
                    continue
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    yield line_no, BadRow(str(path), line_no, "invalid JSON", str(err), "fix or remove the line")
                    continue
                yield line_no, row if isinstance(row, dict) else BadRow(
                    str(path), line_no, "not a JSON object", line.strip()[:60], "write one object per line")
    elif fmt == "parquet":
        import pyarrow
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
        except pyarrow.ArrowException as err:
            raise DataError(f"{str(path)!r} is not a parquet file ({err}): if it holds another format, name it "
                            f"after that format (e.g. .jsonl) or set data.format") from None
        row_no = 0
        for batch in parquet.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                row_no += 1
                yield row_no, row
    else:
        import datasets

        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            if len(data) != 1:
                raise DataError(f"data.path={str(path)!r} holds splits {sorted(data)}: point it at one of them, "
                                f"e.g. {path}/{sorted(data)[0]}")
            data = next(iter(data.values()))
        for row_no, row in enumerate(data, 1):
            yield row_no, row


def row_to_record(row: dict[str, Any], file: str, line: int, fields: FieldMap) -> PromptRecord | BadRow:
    if fields.question not in row:
        return BadRow(file, line, "missing question", f"columns: {', '.join(map(str, row))}",
                      "set data.fields.question=<column>")
    question = row[fields.question]
    if not isinstance(question, str):
        return BadRow(file, line, "question is not text", repr(question)[:60], "check data.fields.question")
    if not question.strip():
        return BadRow(file, line, "empty question", "", "remove the row")
    answer, solution = row.get(fields.answer), row.get(fields.solution)
    record_id = row.get(fields.id)
    return PromptRecord(id=str(record_id) if record_id is not None else f"{Path(file).stem}-{line}",
                        question=question, gold_answer=None if answer is None else str(answer),
                        solution=None if solution is None else str(solution))


def load_prompts(path: str | Path, fields: FieldMap = FieldMap(), fmt: str = "auto",
                 on_bad_row: str = "skip") -> PromptSet:
    if on_bad_row not in ("skip", "error"):
        raise DataError(f"data.on_bad_row={on_bad_row!r} is not one of skip, error")
    records, bad, seen = [], [], set()
    for line, row in iter_rows(path, fmt):
        item = row if isinstance(row, BadRow) else row_to_record(row, str(path), line, fields)
        if isinstance(item, PromptRecord) and item.id in seen:
            item = BadRow(str(path), line, "duplicate id", item.id, "give every row a unique id")
        if isinstance(item, BadRow):
            if on_bad_row == "error":
                raise DataError(str(item))
            bad.append(item)
            continue
        seen.add(item.id)
        records.append(item)
    if bad:
        counts = ", ".join(f"{n} {reason}" for reason, n in Counter(b.reason for b in bad).items())
        log.warning("%s: skipped %d bad rows (%s); first: %s", path, len(bad), counts, bad[0])
    if not records:
        raise DataError(f"data.path={str(path)!r} yielded no usable prompts ({len(bad)} bad rows)"
                        + (f"; first: {bad[0]}" if bad else ""))
    return PromptSet(records, bad)


def load_prompts_from_config(data, split: str = "rl") -> PromptSet:
    """The prompts a `DataConfig` describes: a file / directory (all of it), or `builtin:<task>`'s
    `split` (`data.splits`: data.builtin_size distinct questions)."""
    if data.path.startswith("builtin:"):
        from megatron_mgrpo.data.splits import builtin_split

        return PromptSet(builtin_split(data.path.split(":", 1)[1], split, data.builtin_size, data.seed))
    fields = FieldMap(**{name: getattr(data.fields, name) for name in ("id", "question", "answer", "solution")})
    return load_prompts(data.path, fields, data.format, data.on_bad_row)
