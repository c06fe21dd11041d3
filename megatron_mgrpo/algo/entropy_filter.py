"""The IQR low-entropy filter: drop trajectories whose entropy is an outlier on the low side.

Self-rewarding RL tends to collapse into overconfidence: a few near-deterministic trajectories
win the vote and get reinforced until the policy's entropy is gone. M-GRPO drops, per prompt,
the trajectories whose mean token entropy falls below T = Q1 - k (Q3 - Q1), an outlier fence
that moves with the entropy distribution during training (a fixed "bottom 10 %" rule would
always drop something, and would keep dropping once everything has collapsed together).
"""

from __future__ import annotations

import torch


def iqr_threshold(entropy: torch.Tensor, k: float = 0.75) -> torch.Tensor:
    """T = Q1 - k (Q3 - Q1) per prompt over the G trajectories of `entropy` [P, G] -> [P] (float64).

    Quartiles interpolate linearly (numpy's default) over the row's non-NaN entropies; a row
    that is all NaN gets NaN. Computed in float64 so that the comparison against the inputs in
    `iqr_keep_mask` is exact whatever their dtype.
    """
    if k < 0:
        raise ValueError(f"algo.iqr_k={k} must be >= 0 (the fence sits k interquartile ranges below Q1)")
    if entropy.dim() != 2 or not entropy.is_floating_point():
        raise ValueError(f"entropy must be a float [prompts, group] tensor, got {entropy.dtype} "
                         f"{tuple(entropy.shape)}")
    entropy = entropy.double()
    q1, q3 = torch.nanquantile(entropy, entropy.new_tensor([0.25, 0.75]), dim=-1)
    return q1 - k * (q3 - q1)


def iqr_keep_mask(entropy: torch.Tensor, k: float = 0.75) -> torch.Tensor:
    """keep [P, G] (True = trained on): H >= T, with T from `iqr_threshold`.

    Nothing is dropped when the entropies of a prompt are equal (IQR = 0, T = Q1 = every H),
    and the most uncertain trajectory is always kept (T <= Q1 <= max). With G = 1 or 2 nothing
    can be dropped either: T falls at or below the smallest entropy. A NaN entropy (a response
    with no tokens) is left out of the quartiles and dropped itself, as it has nothing to train
    on; a row of only NaN drops everything. The caller keeps `keep[:, :M]` for the M policy
    responses: the momentum responses shape the fence but are never trained on.
    """
    return entropy.double() >= iqr_threshold(entropy, k)[:, None]  # NaN compares False

