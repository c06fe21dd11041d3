#!/usr/bin/env bash
# Download, on a machine with network, the wheels the GPU machine lacks (it has Python 3.12, torch,
# transformers, safetensors and numpy, and no network), into tools/gpu_check/wheels (git-ignored),
# which travels with the repository to the device. Versions are pinned to the ones this project
# is tested with on CPU, so that the GPU run measures the same code.
# Run from anywhere: tools/gpu_check/fetch_wheels.sh
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DEST="$HERE/wheels"
LIMIT_MIB=48  # the carried tree (repository + wheels) must stay under 64 MiB

# Pure-Python (or cp312 manylinux) runtime needs of the runner and of `pytest -m cuda`.
# megatron-core: 0.16.1, the newest release on the index and the version cpu_compat targets.
# Not fetched: reasoning-gym and its ten dependencies (only the data pipeline imports them, no
# part of the check does), and the GPU extras (Transformer Engine, vLLM, SGLang: CUDA builds far
# over the size limit).
PACKAGES=(
  megatron-core==0.16.1
  omegaconf==2.4.0
  antlr4-python3-runtime==4.13.2
  math-verify==0.9.0
  latex2sympy2_extended==1.11.0
  xxhash==4.1.0
  psutil==7.2.2
  rich==15.0.0
  markdown-it-py==4.3.0
  mdurl==0.1.2
  pygments==2.20.0
  pytest==9.0.3
  pluggy==1.6.0
  iniconfig==2.3.0
)

mkdir -p "$DEST"
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --abi abi3 --abi none --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_28_x86_64 --platform any -d "$DEST" "${PACKAGES[@]}"

total=$(du -cb "$DEST"/*.whl | tail -n1 | cut -f1)
find "$DEST" -maxdepth 1 -name '*.whl' -printf '%s %f\n' | sort -k2 | awk '{printf "%10.2f MiB  %s\n", $1 / 1048576, $2}'
printf 'total %.2f MiB (limit %d MiB)\n' "$(echo "$total / 1048576" | bc -l)" "$LIMIT_MIB"
if (( total > LIMIT_MIB * 1048576 )); then
  echo "error: the wheels take more than $LIMIT_MIB MiB: drop a package from PACKAGES" >&2
  exit 1
fi
