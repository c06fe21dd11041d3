"""Token entropy and Intuitor's self-certainty from full-vocabulary logits.

These are single-device references: the vocab-parallel versions used in training split the
same formulas across tensor-parallel ranks and are tested against these.
"""

from __future__ import annotations

import math

import torch


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim: [..., V] -> [...] in fp32.

    -sum p log p with log p from `log_softmax` (stable for large logits, no logZ - E[logit]
    cancellation). Logits of -inf (masked vocabulary) contribute 0 rather than 0 * -inf = NaN.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp.clamp(min=torch.finfo(logp.dtype).min)).sum(-1)


def self_certainty_from_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Intuitor's self-certainty per sequence: mean over response tokens of KL(U || p), fp32.

    KL(U || p) = -log V - mean_v log p_v: how far each next-token distribution is from uniform
    (0 for a uniform one, growing as the model gets certain). logits [B, T, V], mask [B, T] -> [B];
    a sequence with no response tokens gets 0.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    per_token = -math.log(logits.shape[-1]) - logp.mean(-1)
    valid = mask.bool()
    return torch.where(valid, per_token, 0).sum(-1) / valid.sum(-1).clamp(min=1)
