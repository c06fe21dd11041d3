"""The Slurm scripts, the Dockerfile and the generated configuration reference."""

import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.unit.launch.conftest import ROOT
from tools.config_reference import config_reference

SLURM = ROOT / "examples" / "slurm"
SCRIPTS = sorted(SLURM.glob("*.sbatch"))
SHELL = [*SCRIPTS, SLURM / "common.sh", *sorted((ROOT / "tools").rglob("*.sh")), ROOT / ".ci" / "run"]


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[test]' (it ships the binary)")
    return path


def test_shellcheck_passes():
    out = subprocess.run([_tool("shellcheck"), "-x", *map(str, SHELL)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


def _dry_run(script: str, nodelist: str, nodes: int, *overrides: str, **env: str) -> str:
    slurm = {"SLURM_JOB_ID": "900", "SLURM_JOB_NAME": "test", "SLURM_JOB_NODELIST": nodelist,
             "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_GPUS_ON_NODE": "8", "SLURM_SUBMIT_DIR": str(ROOT),
             "MGRPO_DRY_RUN": "1", "LOG_DIR": "/tmp/mgrpo-test-logs"}
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]
    out = subprocess.run(["bash", str(SLURM / script), *overrides], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, **slurm, **env, "PATH": path}, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_single_node_script_renders_colocated_commands():
    out = _dry_run("mgrpo_qwen3_4b_1node.sbatch", "h100-07", 1, "train.steps=3")
    commands = [line.strip() for line in out.splitlines() if line.startswith("  srun")]
    assert len(commands) == 9  # 6 policy + 2 momentum engines, then the trainer
    assert all("--nodelist=h100-07" in c for c in commands)
    assert commands[0].endswith("--port 30000 --tp-size 1 --mem-fraction-static 0.35 --context-length 4096 "
                                "--dtype bfloat16")
    train = commands[-1]
    assert "--ntasks-per-node=8" in train and "MASTER_ADDR=h100-07" in train
    assert train.endswith("train --config examples/configs/mgrpo_qwen3_4b_math.yaml log.out_dir=runs/900 "
                          "checkpoint.resume=true launch.engine_python=python3 train.steps=3")


@pytest.mark.slow
def test_container_image_from_the_environment_wraps_every_step():
    """CONTAINER_IMAGE alone mounts the submit directory at its own path and works there, so the run's
    relative paths resolve alike inside and outside; CONTAINER_MOUNTS / CONTAINER_WORKDIR replace that."""
    image = "nvcr.io#acme/mgrpo:0.1.0"
    out = _dry_run("mgrpo_qwen3_4b_1node.sbatch", "h100-07", 1, CONTAINER_IMAGE=image)
    commands = [line.strip() for line in out.splitlines() if line.startswith("  srun")]
    flags = f"'--container-image={image}' --container-mounts={ROOT}:{ROOT} --container-workdir={ROOT} env "
    assert len(commands) == 9 and all(flags in c for c in commands)
    assert f"launch.container_image={image}" in commands[-1].replace("'", "")  # the trainer sees the same config

    out = _dry_run("mgrpo_qwen3_4b_1node.sbatch", "h100-07", 1, CONTAINER_IMAGE=image,
                   CONTAINER_MOUNTS="/lustre/me/mgrpo:/workspace,/lustre/data:/data:ro", CONTAINER_WORKDIR="/workspace")
    commands = [line.strip() for line in out.splitlines() if line.startswith("  srun")]
    flags = "--container-mounts=/lustre/me/mgrpo:/workspace,/lustre/data:/data:ro --container-workdir=/workspace env "
    assert len(commands) == 9 and all(flags in c for c in commands)


@pytest.mark.slow
def test_disaggregated_script_renders_moe_pools():
    out = _dry_run("mgrpo_disaggregated.sbatch", "gpu-[001-004,010-013]", 8,
                   CONFIG="examples/configs/mgrpo_qwen3_30b_a3b_math.yaml",
                   MODEL_CONFIG="examples/model_configs/Qwen3-30B-A3B-Base.json")
    assert "tp=2 pp=1 cp=1 ep=8 -> dp=16 over 32 GPUs" in out
    commands = [line.strip() for line in out.splitlines() if line.startswith("  srun")]
    momentum = [c for c in commands if "--job-name=momentum-engine" in c]
    assert len(momentum) == 2 and all("--nodelist=gpu-013" in c for c in momentum)
    assert "--nodelist=gpu-001,gpu-002,gpu-003,gpu-004" in commands[-1]


def test_preemption_trap_checkpoints_then_requeues():
    common = (SLURM / "common.sh").read_text()
    assert "trap 'preempted=1; kill -USR1" in common and 'scontrol requeue "$SLURM_JOB_ID"' in common
    for script in SCRIPTS:
        text = script.read_text()
        assert re.search(r"^#SBATCH --signal=B:USR1@\d+$", text, re.M), script.name
        assert "#SBATCH --requeue" in text, script.name


def test_dockerfile_passes_hadolint():
    out = subprocess.run([_tool("hadolint"), "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


def test_dockerfile_pins_every_version_and_drops_root():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM nvcr\.io/nvidia/pytorch:\d{2}\.\d{2}-py3$", text, re.M)
    for package in ("megatron-core", "sglang", "vllm", "nvidia-modelopt", "wandb"):
        assert re.search(rf"\b{package}(\[\w+\])?==\d+(\.\d+)+\b", text), f"{package} is not pinned"
    assert re.search(r"^USER (?!root|0\b)\S+$", text, re.M)
    assert "mgrpo launch --config examples/configs/mgrpo_qwen3_4b_math.yaml" in text


def test_config_reference_matches_the_schema():
    committed = (ROOT / "docs" / "config-reference.md").read_text()
    assert committed == config_reference(), "regenerate: python tools/config_reference.py > docs/config-reference.md"
