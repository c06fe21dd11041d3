"""Single-process checks of the CUDA paths (`pytest -m cuda`; the GPU check kit runs them on a lent GPU).

Everything else in the suite runs on CPU: these compare what the GPU computes with the same
computation on the CPU, for the pieces whose code branches on the device. Skipped without CUDA.
"""

import pytest
import torch

from megatron_mgrpo.algo import ema_update_
from megatron_mgrpo.parallel.cpu_compat import apply_cpu_compat
from megatron_mgrpo.rollout import SamplingParams
from megatron_mgrpo.rollout.hf_engine import HFEngine
from megatron_mgrpo.sync.buckets import tensor_checksum

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SHAPES = ((64, 48), (1000,), (3, 5, 7))


def test_cpu_compat_is_inactive_with_cuda():
    assert apply_cpu_compat() is False
    assert isinstance(torch.cuda.current_device(), int)


@pytest.mark.parametrize("src_dtype", [torch.float32, torch.bfloat16])
def test_ema_update_on_cuda_matches_the_cpu(src_dtype):
    g = torch.Generator().manual_seed(0)
    ema = [torch.randn(*shape, generator=g) for shape in SHAPES]
    src = [torch.randn(*shape, generator=g).to(src_dtype) for shape in SHAPES]
    on_gpu = [t.cuda() for t in ema]
    ema_update_(on_gpu, [s.cuda() for s in src], 0.99)
    ema_update_(ema, src, 0.99)
    for gpu, cpu in zip(on_gpu, ema):
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-6, atol=1e-6)


def test_checksum_of_a_cuda_tensor_is_that_of_its_bytes():
    tensor = torch.randn(257, dtype=torch.float32).to(torch.bfloat16)
    assert tensor_checksum(tensor.cuda()) == tensor_checksum(tensor)


def test_hf_engine_samples_on_cuda_with_teacher_forced_logprobs(make_tiny_qwen3, tokenizer):
    model = make_tiny_qwen3().cuda()
    engine = HFEngine(model, tokenizer, seed=0)
    prompts = [tokenizer.encode(text) for text in ("1+1=", "x")]
    samples = engine.generate(prompts, n=2, sampling=SamplingParams(temperature=1.0, max_new_tokens=8))
    assert len(samples) == 4
    for sample in samples:
        ids = torch.tensor([sample.prompt_ids + sample.response_ids], device="cuda")
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(sample.prompt_ids) - 1:-1].float()
        reference = torch.log_softmax(logits, -1).gather(-1, torch.tensor(sample.response_ids, device="cuda")[:, None])
        torch.testing.assert_close(torch.tensor(sample.logprobs), reference.squeeze(-1).cpu(), rtol=1e-4, atol=1e-4)


def test_hf_engine_takes_cpu_weights_into_cuda_parameters(make_tiny_qwen3, tokenizer):
    engine = HFEngine(make_tiny_qwen3().cuda(), tokenizer)
    update = {name: torch.randn_like(t, device="cpu") for name, t in make_tiny_qwen3(seed=1).state_dict().items()}
    engine.update_weights(update.items(), version=1)
    params = dict(engine.model.named_parameters())
    assert all(torch.equal(params[name].cpu(), t) for name, t in update.items() if name in params)
    assert engine.weights_version == 1
