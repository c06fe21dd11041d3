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

import torch
import torch.distributed as dist


def _masked_padding(local_logits: torch.Tensor, vocab_size: int, temperature: float) -> torch.Tensor:
    from megatron.core import parallel_state

    width = local_logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * width
    logits = local_logits.float() / temperature
    if start + width > vocab_size:
        padding = torch.arange(start, start + width, device=logits.device) >= vocab_size
        logits = logits.masked_fill(padding, float("-inf"))
    return logits


def vocab_parallel_logprobs(local_logits: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                            temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T)[target] per token; local_logits [..., V_local], targets [...]; differentiable."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    logits = _masked_padding(local_logits, vocab_size, temperature)
    # megatron's kernel wants finite logits (it subtracts the max); -inf padding becomes a very small number
    logits = torch.nan_to_num(logits, neginf=torch.finfo(logits.dtype).min / 2)
    return -vocab_parallel_cross_entropy(logits, targets)


@torch.no_grad()
def vocab_parallel_entropy(local_logits: torch.Tensor, vocab_size: int, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / T) per token (no gradient: it feeds the IQR filter and metrics)."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    logits = _masked_padding(local_logits, vocab_size, temperature)
    peak = logits.amax(dim=-1)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    shifted = logits - peak[..., None]
    weights = shifted.exp()
    sums = torch.stack([weights.sum(-1), (weights * shifted.nan_to_num(neginf=0.0)).sum(-1)])
    dist.all_reduce(sums, group=group)
    normaliser, weighted = sums
    return normaliser.log() - weighted / normaliser
