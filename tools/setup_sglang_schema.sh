#!/usr/bin/env bash
# Builds (once) a small virtual environment in which SGLang's request types import, and prints its
# python. SGLang cannot run on CPU, but its request dataclasses (sglang.srt.managers.io_struct)
# can check our payloads: the wheel goes in with --no-deps (no CUDA kernels, no pinned torch), the
# venv sees the packages (torch, numpy, pydantic, ...) of the python3 that runs this script (the
# trainer's environment, a virtual one included: a .pth file names its site-packages, rewritten on
# every call so that it follows the environment that asks), and the few pure or small packages
# io_struct imports that the trainer lacks are added. tests/unit/rollout/sglang_schema.py imports
# it without SGLang's package __init__ (which patches transformers) and with placeholders for the
# two GPU-only imports on its path (triton, and the scheduler's batch module).
set -euo pipefail
VENV="${MGRPO_SGLANG_VENV:-$HOME/.cache/megatron_mgrpo/sglang-schema-0.5.23}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
OWN_SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
python3 -c "import site; print('\n'.join(site.getsitepackages()))" > "$OWN_SITE/mgrpo-builder-site.pth"
if ! "$VENV/bin/python" -c "import msgspec, zmq, pybase64, starlette, torch, importlib.util as u; assert u.find_spec('sglang')" >/dev/null 2>&1; then
    "$VENV/bin/pip" install -q --no-deps "sglang==0.5.23" >&2
    "$VENV/bin/pip" install -q "msgspec>=0.19" "pyzmq>=25" "pybase64>=1.4" "starlette>=0.40" >&2
fi
echo "$VENV/bin/python"
