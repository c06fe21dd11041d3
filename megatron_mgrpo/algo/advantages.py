"""Group-relative advantages over the kept policy responses of each prompt."""

from __future__ import annotations

import torch

ESTIMATORS = ("grpo", "drgrpo", "rloo")


def group_advantages(rewards: torch.Tensor, keep: torch.Tensor, estimator: str = "grpo",
                     eps: float = 1e-6) -> torch.Tensor:
    """Advantages [P, M] from rewards [P, M]; statistics use only responses where `keep` is True.

    grpo: (r - mean) / (std + eps), with the sample (Bessel-corrected) std as in GRPO's
    reference implementation (`torch.std`); drgrpo: r - mean (Dr. GRPO drops the std, which
    otherwise up-weights near-unanimous groups); rloo: r minus the mean of the *other* kept
    responses. Dropped responses, prompts with fewer than two kept responses, and prompts whose
    kept rewards are all equal get advantage 0.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"algo.advantage_estimator={estimator!r} is not one of {', '.join(ESTIMATORS)}")
    if rewards.shape != keep.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and keep {tuple(keep.shape)} must have the same shape")
    kept = keep.to(rewards.dtype)
    count = kept.sum(-1, keepdim=True)
    mean = (rewards * kept).sum(-1, keepdim=True) / count.clamp(min=1)
    centered = (rewards - mean) * kept
    if estimator == "grpo":
        std = ((centered ** 2).sum(-1, keepdim=True) / (count - 1).clamp(min=1)).sqrt()
        advantages = centered / (std + eps)
    elif estimator == "drgrpo":
        advantages = centered
    else:  # r_i - (sum - r_i) / (n - 1) == n / (n - 1) * (r_i - mean)
        advantages = centered * count / (count - 1).clamp(min=1)
    return torch.where(count >= 2, advantages, torch.zeros_like(advantages))
