"""The code passes the linter configured in ruff.toml (pyflakes, pycodestyle, import order, bugbear)."""

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_ruff_check_is_clean():
    ruff = shutil.which("ruff")
    assert ruff, "ruff is a test dependency: pip install -c constraints-cpu.txt -e '.[test]'"
    out = subprocess.run([ruff, "check", "--no-cache", str(ROOT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
