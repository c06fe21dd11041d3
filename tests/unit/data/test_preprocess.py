import json

import pytest

from megatron_mgrpo.cli import main
from megatron_mgrpo.data import DataError, FieldMap, load_prompts
from megatron_mgrpo.data.preprocess import preprocess_file


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_math_style_extracts_gold_from_the_last_box(tmp_path):
    src = write(tmp_path / "math.jsonl", [
        {"problem": "p1", "solution": "first \\boxed{1}, finally \\boxed{\\frac{1}{2}}", "level": "Level 2"},
        {"problem": "p2", "solution": "no box here"},
        {"problem": "p3", "solution": "x", "answer": "7", "unique_id": "test/7.json"}])
    report = preprocess_file(src, tmp_path / "out.jsonl", style="math")
    rows = read(tmp_path / "out.jsonl")
    assert [(r["id"], r["answer"]) for r in rows] == [("math-1", "\\frac{1}{2}"), ("test/7.json", "7")]
    assert report.written == 2 and [(b.line, b.reason) for b in report.bad_rows] == [(2, "no answer")]
    assert "math.jsonl:2: no answer" in report.summary()
    assert [r.id for r in load_prompts(tmp_path / "out.jsonl").records] == ["math-1", "test/7.json"]


def test_aime_style_is_case_insensitive(tmp_path):
    src = write(tmp_path / "aime.jsonl", [{"ID": "2024-I-1", "Problem": "q", "Answer": 204}])
    preprocess_file(src, tmp_path / "out.jsonl", style="aime")
    assert read(tmp_path / "out.jsonl") == [{"id": "2024-I-1", "question": "q", "answer": "204", "solution": None}]


def test_gpqa_becomes_seeded_multiple_choice(tmp_path):
    row = {"Question": "Which?", "Correct Answer": "right", "Incorrect Answer 1": "w1",
           "Incorrect Answer 2": "w2", "Incorrect Answer 3": "w3", "Record ID": "r1"}
    src = write(tmp_path / "gpqa.jsonl", [row, {**row, "Record ID": "r2"}, {**row, "Incorrect Answer 3": ""}])
    report = preprocess_file(src, tmp_path / "a.jsonl", seed=0)  # auto-detected
    first = read(tmp_path / "a.jsonl")
    assert [r["id"] for r in first] == ["r1", "r2"] and report.bad_rows[0].line == 3
    for r in first:
        letter = r["answer"]
        assert f"({letter}) right" in r["question"] and r["question"].count("(") == 4
    preprocess_file(src, tmp_path / "b.jsonl", seed=0)
    assert read(tmp_path / "b.jsonl") == first


def test_field_overrides_errors_and_atomic_output(tmp_path):
    src = write(tmp_path / "odd.jsonl", [{"q": "what?", "gold": "3"}, {"x": 1}])
    preprocess_file(src, tmp_path / "out.jsonl", fields=FieldMap(question="q", answer="gold"))
    assert read(tmp_path / "out.jsonl")[0]["answer"] == "3"
    with pytest.raises(DataError, match="odd.jsonl:2: missing question"):
        preprocess_file(src, tmp_path / "never.jsonl", fields=FieldMap(question="q", answer="gold"), on_bad_row="error")
    assert not (tmp_path / "never.jsonl").exists() and not list(tmp_path.glob("*.partial"))


def test_cli(tmp_path, capsys):
    src = write(tmp_path / "in.jsonl", [{"problem": "p", "solution": "\\boxed{5}"}])
    assert main(["preprocess", "--input", str(src), "--output", str(tmp_path / "o.jsonl")]) == 0
    assert "wrote 1 prompts" in capsys.readouterr().out
    assert main(["preprocess", "--input", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "o2.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.partial"))


def test_no_prompt_written_is_an_error_that_says_why(tmp_path, capsys):
    src = write(tmp_path / "odd.jsonl", [{"q": "what?"}, {"q": "why?"}])
    code = main(["preprocess", "--input", str(src), "--output", str(tmp_path / "o.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "no prompts written: all 2 rows of" in err and "odd.jsonl:1: missing question" in err
    assert "--question-field" in err
    (tmp_path / "empty.jsonl").write_text("\n")
    assert main(["preprocess", "--input", str(tmp_path / "empty.jsonl"), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "has no rows" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists() and not list(tmp_path.glob("*.partial"))
