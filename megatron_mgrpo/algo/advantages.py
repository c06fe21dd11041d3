"""Group-relative advantages over the kept policy responses of each prompt."""

from __future__ import annotations

import torch

from megatron_mgrpo.config import ADVANTAGE_ESTIMATORS


def group_advantages(rewards: torch.Tensor, keep: torch.Tensor, estimator: str = "grpo",
                     eps: float = 1e-6) -> torch.Tensor:
    """Advantages [P, M] from rewards [P, M]; the statistics of a prompt use only its kept responses.

    grpo: (r - mean) / (std + eps). The std is the sample (Bessel-corrected, n - 1) one, as
    `torch.std` computes it in verl (the paper's code base) and TRL, so runs compare with theirs;
    with the small groups left after filtering, the population std would inflate advantages by
    up to sqrt(n / (n - 1)).
    drgrpo: r - mean (Dr. GRPO drops the std division, which up-weights near-unanimous groups).
    rloo: r minus the mean of the *other* kept responses, i.e. n / (n - 1) (r - mean).

    Dropped responses get 0, and so does every response of a prompt with fewer than two kept
    responses or whose kept rewards are all equal: there is no relative signal to learn from.
    """
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"algo.advantage_estimator={estimator!r} is not one of {', '.join(ADVANTAGE_ESTIMATORS)}")
    if rewards.dim() != 2 or rewards.shape != keep.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and keep {tuple(keep.shape)} must both be "
                         f"[prompts, responses]")
    if keep.dtype != torch.bool:
        raise ValueError(f"keep must be a bool mask, got {keep.dtype}")
    rewards = rewards if rewards.is_floating_point() else rewards.float()
    count = keep.sum(-1, keepdim=True).to(rewards.dtype)
    mean = torch.where(keep, rewards, 0).sum(-1, keepdim=True) / count.clamp(min=1)
    centered = torch.where(keep, rewards - mean, 0)
    if estimator == "grpo":
        std = (centered.square().sum(-1, keepdim=True) / (count - 1).clamp(min=1)).sqrt()
        advantages = centered / (std + eps)
    elif estimator == "drgrpo":
        advantages = centered
    else:
        advantages = centered * count / (count - 1).clamp(min=1)
    highest = rewards.masked_fill(~keep, -torch.inf).amax(-1, keepdim=True)
    lowest = rewards.masked_fill(~keep, torch.inf).amin(-1, keepdim=True)
    informative = (count >= 2) & (highest > lowest)  # exact zeros, whatever the rounding of the mean
    return torch.where(informative, advantages, 0)
