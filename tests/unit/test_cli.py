import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_mgrpo.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_mgrpo.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_import_and_help_stay_light():
    """`import megatron_mgrpo` and `mgrpo --help` never import torch or GPU-only libraries."""
    code = ("import sys, megatron_mgrpo, megatron_mgrpo.cli, megatron_mgrpo.config;"
            "from megatron_mgrpo.cli import build_parser; build_parser().format_help();"
            "heavy = {'torch', 'transformer_engine', 'sglang', 'vllm', 'megatron'} & "
            "{m.split('.')[0] for m in sys.modules}; print(sorted(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_subcommand_prints_real_help():
    parser = build_parser()
    subcommands = parser._subparsers._group_actions[0].choices
    assert {"config", "preprocess"} <= set(subcommands)
    for name, sub in subcommands.items():
        text = sub.format_help()
        assert sub.description and len(sub.description) > 20, name
        assert f"mgrpo {name}" in text


@pytest.mark.slow
def test_config_show_prints_resolved_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 5\n")
    out = run_cli("config", "show", "--config", str(path), "algo.momentum=0.9")
    assert out.returncode == 0, out.stderr
    shown = yaml.safe_load(out.stdout)
    assert shown["algo"]["momentum"] == 0.9 and shown["train"]["steps"] == 5
    assert shown["rollout"]["group_size"] == 32


def test_bad_config_is_a_clear_error_not_a_traceback(capsys):
    assert main(["config", "show", "algo.momentom=0.9"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'algo.momentum'" in err and "Traceback" not in err


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    block = re.search(r"<!-- test-command -->\s*```bash\n(.+?)\n```", readme, re.S)
    assert block, "README must mark its test command with <!-- test-command -->"
    command = block.group(1).strip()
    assert command.replace("python3 -m pip install", "pip install").replace(" -q", "") in \
        ci.replace("python3 -m pip install", "pip install").replace(" -q", "")
    # in a virtual environment of its own, made and activated before the command, as a user's
    assert ci.index("python3 -m venv") < ci.index('source "$VENV/bin/activate"') < ci.index("pip install")


def test_unreadable_config_files_are_one_line_errors(tmp_path, capsys):
    """A YAML syntax error names the file and line, a directory is called one (not "missing")."""
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  steps: 5\n  lr: [1, 2\nalgo:\n  momentum: 0.9\n")
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("train:\n  steps: 5  # r\xe9sum\xe9\n".encode("latin-1"))
    for config, expected in ((broken, "is not valid YAML at line 4, column 5: did not find expected ','"),
                             (latin1, "is not UTF-8 text"), (tmp_path, "is a directory: pass a YAML file")):
        assert main(["config", "show", "--config", str(config)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("mgrpo config: error: config file ") and str(config) in err and expected in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_unreadable_data_files_name_the_file(tmp_path, capsys):
    """A text file named .parquet is said not to be parquet; a non-UTF-8 jsonl line is named by its number."""
    fake = tmp_path / "fake.parquet"
    fake.write_text('{"problem": "p", "answer": "1"}\n')
    assert main(["preprocess", "--input", str(fake), "--output", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "fake.parquet' is not a parquet file" in err and len(err.strip().splitlines()) == 1, err
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"problem": "p", "answer": "1"}\n{"problem": "caf\xe9", "answer": "2"}\n')
    assert main(["preprocess", "--input", str(latin1), "--output", str(tmp_path / "o.jsonl"),
                 "--on-bad-row", "error"]) == 2
    err = capsys.readouterr().err
    assert "latin1.jsonl:2: not UTF-8 (byte 17 of the line); save the file as UTF-8" in err and "Traceback" not in err


def test_a_run_none_of_whose_checkpoints_loads_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    import megatron_mgrpo.run
    from megatron_mgrpo.train import CheckpointError

    def train(cfg, out):
        raise CheckpointError(f"no checkpoint of {out} loads (cannot read {out}/checkpoints/step_000010: ...)")

    monkeypatch.setattr(megatron_mgrpo.run, "train", train)
    assert main(["train", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mgrpo train: error: no checkpoint of ") and "Traceback" not in "".join(err)
