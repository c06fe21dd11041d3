import re
import subprocess
import sys
from pathlib import Path

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
