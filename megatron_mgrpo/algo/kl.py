"""Per-token KL penalty towards a reference policy (the initial model or the momentum model)."""

from __future__ import annotations

import torch

from megatron_mgrpo.config import KL_ESTIMATORS


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi (Schulman's k1, k2, k3).

    With log r = ref_logp - logp: k1 = -log r is unbiased but high-variance and often negative;
    k2 = (log r)^2 / 2 is low-variance but biased; k3 = r - log r - 1 is unbiased, low-variance
    and never negative, hence the default. Positions outside the response should hold finite
    log-probs (e.g. 0): exp of a padding value of -inf would turn into NaN gradients.
    """
    log_ratio = ref_logp - logp
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio  # expm1: no cancellation when r is close to 1
    raise ValueError(f"algo.kl_estimator={estimator!r} is not one of {', '.join(KL_ESTIMATORS)}")
