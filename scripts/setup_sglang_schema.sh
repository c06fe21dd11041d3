#!/usr/bin/env bash
# Builds (once) a small virtual environment in which SGLang's request types import, and prints its
# python. SGLang cannot run on CPU, but its request dataclasses (sglang.srt.managers.io_struct)
# can check our payloads: the wheel goes in with --no-deps (no CUDA kernels, no pinned torch), the
# venv sees the trainer's packages (torch, numpy, pydantic, ...), and the few pure or small packages
# io_struct imports that the trainer lacks are added. tests/unit/rollout/sglang_schema.py imports
# it without SGLang's package __init__ (which patches transformers) and with placeholders for the
# two GPU-only imports on its path (triton, and the scheduler's batch module).
set -euo pipefail
VENV="${MGRPO_SGLANG_VENV:-$HOME/.cache/megatron_mgrpo/sglang-schema-0.5.23}"
if ! "$VENV/bin/python" -c "import msgspec, zmq, pybase64, starlette, sglang" >/dev/null 2>&1; then
    python3 -m venv --system-site-packages "$VENV"
    "$VENV/bin/pip" install -q --no-deps "sglang==0.5.23" >&2
    "$VENV/bin/pip" install -q "msgspec>=0.19" "pyzmq>=25" "pybase64>=1.4" "starlette>=0.40" >&2
fi
echo "$VENV/bin/python"
