"""The IQR low-entropy filter: drop trajectories whose entropy is an outlier on the low side.

Self-rewarding RL tends to collapse into overconfidence: a few near-deterministic trajectories
win the vote and get reinforced until the policy's entropy is gone. M-GRPO drops, per prompt,
the trajectories whose mean token entropy falls below T = Q1 - k (Q3 - Q1), an outlier fence
that adapts to how the entropy distribution shifts during training (a fixed "bottom 10 %" rule
would always drop something, and nothing once everything has collapsed together).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def trajectory_entropy(token_entropy: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Mean token entropy over each response's tokens: [B, T] -> [B]; NaN for an empty response."""
    mask = response_mask.to(token_entropy.dtype)
    tokens = mask.sum(-1)
    total = (token_entropy * mask).sum(-1)
    return torch.where(tokens > 0, total / tokens.clamp(min=1), torch.full_like(total, float("nan")))


@dataclass
class IQRFilter:
    """keep [P, G] (True = trained on), the per-prompt threshold [P], and how many were dropped."""

    keep: torch.Tensor
    threshold: torch.Tensor
    dropped: int


def iqr_filter(entropy: torch.Tensor, k: float = 0.75) -> IQRFilter:
    """Apply T = Q1 - k (Q3 - Q1) per prompt over all G trajectories of `entropy` [P, G].

    Quartiles use linear interpolation (numpy's default) over the finite entropies of the row.
    Equal entropies give IQR = 0 and T = Q1, so nothing is dropped; G = 1 or 2 behave the same
    way by construction (nothing lies strictly below the smallest value). NaN entropies (empty
    responses) are excluded from the quartiles and dropped themselves, since they carry no
    tokens to train on; a row of only NaN drops everything.
    """
    if k < 0:
        raise ValueError(f"algo.iqr_k={k} must be >= 0")
    if entropy.dim() != 2:
        raise ValueError(f"entropy must be [prompts, group], got shape {tuple(entropy.shape)}")
    q1, q3 = torch.nanquantile(entropy.double(), torch.tensor([0.25, 0.75], dtype=torch.double), dim=-1)
    threshold = (q1 - k * (q3 - q1)).to(entropy.dtype)
    keep = entropy >= threshold[:, None]  # NaN compares False: empty responses are dropped
    return IQRFilter(keep=keep, threshold=threshold, dropped=int((~keep).sum()))
