"""Per-token log-probs and entropy from vocab-parallel logits, never gathering the vocabulary.

Under tensor parallelism each rank holds logits for a slice of the (padded) vocabulary. Full
logits are [tokens, vocab] per rank, the largest activation of the model for a 150k
vocabulary; gathering them for a log-softmax would multiply that by TP. Instead the log-prob of
the chosen token comes from megatron-core's `vocab_parallel_cross_entropy` (which reduces the
max, the normaliser and the target logit across the TP group and has the matching backward), and
the entropy H = logZ - sum p z is assembled from two scalar all-reduces per token. Columns that
only pad the vocabulary to a TP-friendly size are masked out first: their logits are not part of
the model's distribution.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist


def _masked_padding(local_logits: torch.Tensor, vocab_size: int, temperature: float) -> torch.Tensor:
    """fp32 logits / T with padding columns at a very negative finite value (copies only what it must)."""
    logits = local_logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    padding = _padding_columns(logits, vocab_size)
    if padding is not None:
        # finite, because megatron's kernel subtracts the max; exp() of it is exactly 0
        logits = logits.masked_fill(padding, torch.finfo(logits.dtype).min / 2)
    return logits


def _padding_columns(local_logits: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
    """Which of this TP rank's logit columns are vocabulary padding; None where none are."""
    from megatron.core import parallel_state

    width = local_logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * width
    if start + width <= vocab_size:
        return None
    return torch.arange(start, start + width, device=local_logits.device) >= vocab_size


def vocab_parallel_logprobs_and_entropy(local_logits: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                                        temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(log softmax(logits / T)[target], entropy) per token; local_logits [..., V_local], targets [...].

    The log-probs are differentiable, the entropy is not. The logits are CONSUMED: megatron's
    kernel subtracts the max and exponentiates in place, which is what keeps the memory at one
    copy of the largest activation; this must therefore be their last use, and the entropy,
    which only reads them, is computed first.
    """
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    entropy = vocab_parallel_entropy(local_logits, vocab_size, temperature)
    logprobs = -vocab_parallel_cross_entropy(_masked_padding(local_logits, vocab_size, temperature), targets)
    return logprobs, entropy


@torch.no_grad()
def vocab_parallel_entropy(local_logits: torch.Tensor, vocab_size: int, temperature: float = 1.0,
                           chunk_tokens: int = 256) -> torch.Tensor:
    """Entropy of softmax(logits / T) per token (no gradient: it feeds the IQR filter and metrics):
    H = log Z - sum_v p_v (z_v - max z), with Z the normaliser of the shifted logits."""
    _, normaliser, weighted = _softmax_sums(local_logits, vocab_size, temperature, chunk_tokens,
                                            lambda logits, shifted, weights: torch.linalg.vecdot(weights, shifted))
    return (normaliser.log() - weighted / normaliser).reshape(local_logits.shape[:-1])


@torch.no_grad()
def vocab_parallel_self_certainty(local_logits: torch.Tensor, vocab_size: int, chunk_tokens: int = 256) -> torch.Tensor:
    """Intuitor's per-token self-certainty KL(U || p) = log Z - mean_v z_v - log V, p = softmax(z),
    over the real vocabulary (at temperature 1: it scores the model, not the sampler)."""
    padding = _padding_columns(local_logits, vocab_size)

    def real_logit_sum(logits, shifted, weights):
        return (logits if padding is None else logits.masked_fill(padding, 0)).sum(-1)

    peak, normaliser, total = _softmax_sums(local_logits, vocab_size, 1.0, chunk_tokens, real_logit_sum)
    return (peak + normaliser.log() - total / vocab_size - math.log(vocab_size)).reshape(local_logits.shape[:-1])


def _softmax_sums(local_logits: torch.Tensor, vocab_size: int, temperature: float, chunk_tokens: int,
                  term: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]):
    """Per token, over the whole (TP-split) vocabulary of logits / T with padding masked: the
    peak logit, the normaliser Z = sum exp(z - peak), and the sum of `term(logits, logits - peak,
    exp(logits - peak))` (a row sum per token). Tokens are processed in chunks so the temporaries
    stay a small fraction of the logits; the TP group sees two all-reduces in total."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    rows = local_logits.reshape(-1, local_logits.shape[-1])
    peak = torch.cat([_masked_padding(chunk, vocab_size, temperature).amax(dim=-1)
                      for chunk in rows.split(chunk_tokens)])
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    sums = torch.empty(2, rows.shape[0], device=rows.device)
    for index, chunk in enumerate(rows.split(chunk_tokens)):
        span = slice(index * chunk_tokens, index * chunk_tokens + chunk.shape[0])
        logits = _masked_padding(chunk, vocab_size, temperature)
        shifted = logits - peak[span, None]
        weights = shifted.exp()
        sums[0, span] = weights.sum(-1)
        sums[1, span] = term(logits, shifted, weights)
    dist.all_reduce(sums, group=group)
    return peak, sums[0], sums[1]
