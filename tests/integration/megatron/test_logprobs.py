"""Vocab-parallel log-probs, their gradient, and entropy vs a single-process reference (TP=2, gloo)."""

import pytest
import torch
import torch.multiprocessing as mp

from megatron_mgrpo.algo import entropy_from_logits
from megatron_mgrpo.rollout.server import free_port

VOCAB, PADDED = 101, 128  # the last 27 columns only pad the vocabulary


def reference(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 5, PADDED, generator=g) * 3
    targets = torch.randint(0, VOCAB, (3, 5), generator=g)
    return logits, targets


def check(rank: int, world: int, port: int) -> None:
    from megatron_mgrpo.parallel.dist import Launch, destroy_distributed, init_distributed
    from megatron_mgrpo.train.logprobs import vocab_parallel_entropy, vocab_parallel_logprobs

    init_distributed(tp=world, launch=Launch(rank, world, rank, "127.0.0.1", port))
    try:
        full, targets = reference()
        temperature = 1.1
        expected_logits = (full[..., :VOCAB] / temperature).requires_grad_(True)
        expected = torch.log_softmax(expected_logits, -1).gather(-1, targets[..., None]).squeeze(-1)
        expected.sum().backward()

        local = full.chunk(world, dim=-1)[rank].clone().requires_grad_(True)
        logprobs = vocab_parallel_logprobs(local, targets, VOCAB, temperature)
        assert torch.allclose(logprobs, expected, atol=1e-5), (logprobs - expected).abs().max()
        logprobs.sum().backward()
        width = PADDED // world
        grad_full = torch.zeros_like(full)
        grad_full[..., :VOCAB] = expected_logits.grad / temperature  # chain rule through the 1/T scaling
        assert torch.allclose(local.grad, grad_full[..., rank * width:(rank + 1) * width], atol=1e-5)

        entropy = vocab_parallel_entropy(local.detach(), VOCAB, temperature)
        assert torch.allclose(entropy, entropy_from_logits(full[..., :VOCAB] / temperature), atol=1e-5)
    finally:
        destroy_distributed()


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("world", [1, 2])
def test_vocab_parallel_logprobs_and_entropy(world):
    mp.start_processes(check, args=(world, free_port()), nprocs=world, start_method="spawn")
