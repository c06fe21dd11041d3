"""`mgrpo train` with real vLLM servers: the policy pool on a server a launcher started (found
through MGRPO_POLICY_URLS, as `mgrpo launch` passes it), the momentum pool on a server the
trainer starts itself. Every weight push must reach the right server."""

import json
import math
import os
import subprocess
import sys

import torch

from megatron_mgrpo.metrics import read_metrics
from megatron_mgrpo.models.builtin import resolve_model_path
from megatron_mgrpo.parallel.ports import free_port
from megatron_mgrpo.rollout import SamplingParams
from megatron_mgrpo.rollout.server import ServerProcess, ServerSpec
from megatron_mgrpo.rollout.vllm_engine import PACKAGE_ROOT, SERVER_ENV, WORKER_EXTENSION, VLLMEngine
from tests.integration.engines.test_vllm_engine import CPU_ENV, VLLM_PYTHON, pytestmark, reference_logprobs  # noqa: F401

STEPS = ["train.steps=2", "train.prompts_per_step=4", "rollout.group_size=6", "rollout.momentum_samples=2",
         "rollout.max_new_tokens=8", "warmstart.steps=30", "eval.prompts=0", "checkpoint.interval=2",
         "log.wandb=disabled", "data.builtin_size=64", "launch.max_prompt_tokens=64",
         "train.lr=0.001", "train.lr_schedule=constant"]  # steps large enough to tell the weights apart


def launched_server(model_dir, log_file) -> ServerProcess:
    """A vLLM server started the way `mgrpo launch` starts one (see launch/render.py)."""
    port = free_port()
    command = [VLLM_PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
               "--served-model-name", "policy", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
               "--max-model-len", "256", "--logprobs-mode", "processed_logprobs",
               "--worker-extension-cls", WORKER_EXTENSION, "--enforce-eager"]
    return ServerProcess(ServerSpec(command, port, log_file, env={**SERVER_ENV, **CPU_ENV, "PYTHONPATH": PACKAGE_ROOT},
                                    startup_timeout_s=400))


def test_trainer_attaches_to_launched_servers_and_starts_its_own(tmp_path):
    """The launched server starts from model.path; the trainer warm-starts that model and must
    push its own starting weights before sampling, then every step's."""
    cache = tmp_path / "cache"
    model_dir = resolve_model_path("builtin:tiny-qwen3", cache)
    run = tmp_path / "run"
    with launched_server(model_dir, tmp_path / "policy-server.log") as server:
        env = {**os.environ, **CPU_ENV, "MGRPO_CACHE": str(cache), "MASTER_PORT": str(free_port()),
               "MGRPO_POLICY_URLS": server.spec.url}
        subprocess.run([sys.executable, "-m", "megatron_mgrpo.cli", "train", "--out", str(run), *STEPS,
                        "rollout.engine=vllm", f"launch.engine_python={VLLM_PYTHON}"],
                       env=env, check=True, timeout=1200)

        summary = json.loads((run / "summary.json").read_text())
        records = read_metrics(run)
        assert summary["steps"] == 2 and all(r["iqr/kept"] > 0 and math.isfinite(r["train/loss"]) for r in records)
        assert 0 < records[0]["label/agreement"] <= 1  # both pools answered
        # the trainer started the momentum server only, and stopped it; the launched one still serves
        assert [p.name.split("-")[1] for p in (run / "logs").glob("vllm-*.log")] == ["momentum"]
        assert server.healthy()
        # ... and holds the weights of the last push: the final policy, as exported
        from transformers import AutoModelForCausalLM, AutoTokenizer

        final = AutoModelForCausalLM.from_pretrained(run / "hf" / "policy", dtype=torch.float32).eval()
        initial = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        engine = VLLMEngine(model_dir, url=server.spec.url)
        prompt = AutoTokenizer.from_pretrained(model_dir).encode("12+7=")
        samples = engine.generate([prompt], n=4, sampling=SamplingParams(max_new_tokens=8, seed=1))
        engine.shutdown()
        for sample in samples:
            served = torch.tensor(sample.logprobs)
            assert torch.allclose(served, reference_logprobs(final, sample), atol=1e-4)
        assert not all(torch.allclose(torch.tensor(s.logprobs), reference_logprobs(initial, s), atol=1e-4)
                       for s in samples)
