import json
import subprocess
import sys

import pytest

from megatron_mgrpo.config import load_config
from megatron_mgrpo.data import (
    DataError,
    FieldMap,
    PromptRecord,
    PromptTemplate,
    load_prompts,
    load_prompts_from_config,
    synthetic_prompts,
)

ROWS = [{"id": "a", "question": "1+1?", "answer": 2}, {"id": "b", "question": "2+2?", "answer": "4"}]


def write_jsonl(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "hf"])
def test_every_format_reads_the_same_records(tmp_path, fmt):
    if fmt == "jsonl":
        path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist([{**r, "answer": str(r["answer"])} for r in ROWS]), path)
    else:
        import datasets

        path = tmp_path / "d_hf"
        datasets.Dataset.from_list([{**r, "answer": str(r["answer"])} for r in ROWS]).save_to_disk(str(path))
    prompts = load_prompts(path)
    assert prompts.records == [PromptRecord("a", "1+1?", "2"), PromptRecord("b", "2+2?", "4")]
    assert prompts.bad_rows == []


def test_field_mapping_and_generated_ids(tmp_path):
    path = write_jsonl(tmp_path / "math.jsonl", [{"problem": "x?", "final": "3", "sol": "so \\boxed{3}"}])
    record, = load_prompts(path, FieldMap(question="problem", answer="final", solution="sol")).records
    assert record == PromptRecord("math-1", "x?", "3", "so \\boxed{3}")


def test_bad_rows_are_reported_with_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        ROWS[0], "{not json", "[1, 2]", {"id": "c", "prompt": "no question column"},
        {"id": "d", "question": 5}, {"id": "e", "question": "  "}, {"id": "a", "question": "dup"}, ROWS[1]])
    prompts = load_prompts(path)
    assert [r.id for r in prompts.records] == ["a", "b"]
    assert [(b.line, b.reason) for b in prompts.bad_rows] == [
        (2, "invalid JSON"), (3, "not a JSON object"), (4, "missing question"), (5, "question is not text"),
        (6, "empty question"), (7, "duplicate id")]
    assert prompts.bad_row_counts()["invalid JSON"] == 1
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        load_prompts(path, on_bad_row="error")
    only_missing = write_jsonl(tmp_path / "m.jsonl", [{"id": "c", "prompt": "q"}])
    with pytest.raises(DataError, match=r"m.jsonl:1: missing question \(columns: id, prompt\); "
                                        r"set data.fields.question=<column>"):
        load_prompts(only_missing, on_bad_row="error")


def test_unreadable_sources(tmp_path):
    with pytest.raises(DataError, match="data.path='.*missing.jsonl' does not exist"):
        load_prompts(tmp_path / "missing.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="cannot tell the format"):
        load_prompts(tmp_path / "x.csv")
    with pytest.raises(DataError, match="no usable prompts"):
        load_prompts(write_jsonl(tmp_path / "e.jsonl", ["{oops"]))


@pytest.mark.slow
def test_synthetic_tasks_are_deterministic_across_processes():
    for task in ("arithmetic", "chain_sum", "gsm"):
        first = synthetic_prompts(task, 5, seed=3)
        assert len(first) == 5 and all(r.gold_answer for r in first)
        assert first == synthetic_prompts(task, 5, seed=3) != synthetic_prompts(task, 5, seed=4)
    code = ("from megatron_mgrpo.data import synthetic_prompts;"
            "print([(r.question, r.gold_answer) for r in synthetic_prompts('arithmetic', 5, seed=3)])")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == str([(r.question, r.gold_answer) for r in synthetic_prompts("arithmetic", 5, seed=3)])
    easy = synthetic_prompts("arithmetic", 20, seed=0, min_terms=2, max_terms=2, max_digits=1)
    assert all(len(r.question) < 40 for r in easy)
    with pytest.raises(DataError, match="builtin:arithmetic, builtin:chain_sum, builtin:gsm"):
        synthetic_prompts("sudoku", 5, 0)
    with pytest.raises(DataError, match="does not take options"):
        synthetic_prompts("arithmetic", 5, 0, colour="red")


def test_config_builtin_and_file(tmp_path):
    cfg = load_config(overrides=["data.path=builtin:chain_sum", "data.builtin_size=7"])
    assert len(load_prompts_from_config(cfg.data).records) == 7
    path = write_jsonl(tmp_path / "p.jsonl", [{"key": "k", "problem": "q?"}])
    cfg = load_config(overrides=[f"data.path={path}", "data.fields.id=key", "data.fields.question=problem"])
    assert load_prompts_from_config(cfg.data).records == [PromptRecord("k", "q?")]


def test_plain_template_and_few_shot():
    pool = [PromptRecord(f"e{i}", f"{i}+{i}=?", str(2 * i)) for i in range(6)]
    plain = PromptTemplate(mode="plain", few_shot=2, examples=pool, seed=1)
    text = plain.render(pool[0])
    assert text.endswith("Question: 0+0=?\nPlease reason step by step, and put your final answer within "
                         "\\boxed{}.\nAnswer:")
    assert text.count("Question:") == 3 and "0+0=?\nAnswer:" not in text  # never shows itself as a shot
    assert plain.render(pool[0]) == text  # deterministic
    for record in pool:
        assert record not in plain.shots(record) and len(plain.shots(record)) == 2
    with pytest.raises(ValueError, match="data.few_shot=9"):
        PromptTemplate(mode="plain", few_shot=9, examples=pool)


def test_chat_template(tokenizer):
    tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    pool = [PromptRecord("a", "1+1=?", "2"), PromptRecord("b", "2+2=?", "4", "2+2 is \\boxed{4}")]
    chat = PromptTemplate(tokenizer, mode="auto", few_shot=1, examples=pool)
    assert chat.render(pool[0]) == ("<user>2+2=?\nPlease reason step by step, and put your final answer within "
                                    "\\boxed{}.\n<assistant>2+2 is \\boxed{4}\n<user>1+1=?\nPlease reason step by "
                                    "step, and put your final answer within \\boxed{}.\n<assistant>")
    assert not PromptTemplate(None).chat
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="use data.template=plain"):
        PromptTemplate(tokenizer, mode="chat")


def test_a_line_that_is_not_utf8_is_a_bad_row_with_its_number(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'{"id": "a", "question": "1+1?"}\n{"id": "b", "question": "caf\xe9?"}\n'
                     b'{"id": "c", "question": "2+2?"}\n')
    prompts = load_prompts(path)
    assert [r.id for r in prompts.records] == ["a", "c"]
    assert [(b.line, b.reason) for b in prompts.bad_rows] == [(2, "not UTF-8")]
    with pytest.raises(DataError, match=r"mixed.jsonl:2: not UTF-8"):
        load_prompts(path, on_bad_row="error")


def test_a_text_file_named_parquet_is_said_not_to_be_parquet(tmp_path):
    path = write_jsonl(tmp_path / "rows.parquet", ROWS)
    with pytest.raises(DataError, match=r"rows.parquet' is not a parquet file .*name it after that format"):
        load_prompts(path)
