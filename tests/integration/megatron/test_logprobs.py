"""Vocab-parallel log-probs, their gradient, entropy and self-certainty vs a single-process reference (gloo)."""

import pytest
import torch
import torch.multiprocessing as mp

from megatron_mgrpo.algo import entropy_from_logits, self_certainty_from_logits
from megatron_mgrpo.parallel.ports import free_port

VOCAB, PADDED = 101, 128  # the last 27 columns only pad the vocabulary


def check_one(rank: int, world: int, temperature: float) -> None:
    from megatron_mgrpo.train.logprobs import vocab_parallel_logprobs_and_entropy

    g = torch.Generator().manual_seed(0)
    full = torch.randn(3, 5, PADDED, generator=g) * 3
    targets = torch.randint(0, VOCAB, (3, 5), generator=g)
    expected_logits = (full[..., :VOCAB] / temperature).requires_grad_(True)
    expected = torch.log_softmax(expected_logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    expected.sum().backward()

    leaf = full.chunk(world, dim=-1)[rank].clone().requires_grad_(True)
    local = leaf * 1.0  # a model's logits are a non-leaf activation
    logprobs, entropy = vocab_parallel_logprobs_and_entropy(local, targets, VOCAB, temperature)
    assert torch.allclose(logprobs, expected, atol=1e-5), (logprobs - expected).abs().max()
    assert torch.allclose(entropy, entropy_from_logits(full[..., :VOCAB] / temperature), atol=1e-5)
    assert not entropy.requires_grad
    logprobs.sum().backward()
    width = PADDED // world
    grad_full = torch.zeros_like(full)
    grad_full[..., :VOCAB] = expected_logits.grad / temperature  # chain rule through the 1/T scaling
    assert torch.allclose(leaf.grad, grad_full[..., rank * width:(rank + 1) * width], atol=1e-5)


def check_self_certainty(rank: int, world: int) -> None:
    """Per token, against the dense definition on the real vocabulary (padding columns excluded)."""
    from megatron_mgrpo.train.logprobs import vocab_parallel_self_certainty

    full = torch.randn(3, 5, PADDED, generator=torch.Generator().manual_seed(1)) * 3
    per_token = vocab_parallel_self_certainty(full.chunk(world, dim=-1)[rank], VOCAB, chunk_tokens=4)
    mask = torch.zeros(3, 5)
    for t in range(5):  # one token at a time: the dense helper averages over the masked tokens
        mask.zero_()
        mask[:, t] = 1
        assert torch.allclose(per_token[:, t], self_certainty_from_logits(full[..., :VOCAB], mask), atol=1e-5)


def check(rank: int, world: int, port: int) -> None:
    from megatron_mgrpo.parallel.dist import Launch, destroy_distributed, init_distributed

    init_distributed(tp=world, launch=Launch(rank, world, rank, "127.0.0.1", port))
    try:
        for temperature in (1.1, 1.0):  # at 1.0 there is no scaling copy: the kernel works in place
            check_one(rank, world, temperature)
        check_self_certainty(rank, world)
    finally:
        destroy_distributed()


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("world", [1, 2])
def test_vocab_parallel_logprobs_and_entropy(world):
    mp.start_processes(check, args=(world, free_port()), nprocs=world, start_method="spawn")
