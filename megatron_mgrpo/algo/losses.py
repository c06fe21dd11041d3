"""Policy-gradient loss, KL penalty and entropy, token-level and batched.

The surrogate is the PPO-clip objective with separate lower / upper epsilons; in the on-policy
case (one optimizer step per rollout batch) `old_logp` equals `logp.detach()`, the ratio is 1
and the gradient is exactly REINFORCE with group advantages. Truncated importance sampling
corrects for the engine sampling from slightly different numerics than the trainer's
(different kernels, bf16 / FP8 rollout weights): each token is weighted by
w = pi_old(y) / pi_rollout(y), capped, which keeps the surrogate's gradient valid when the
train-inference mismatch is small and bounded when it is not.
"""

from __future__ import annotations

import math

import torch

AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")
TIS_MODES = ("truncate", "mask")
KL_ESTIMATORS = ("k1", "k2", "k3")


def aggregate(values: torch.Tensor, mask: torch.Tensor, agg: str = "token-mean") -> torch.Tensor:
    """Reduce per-token values [B, T] over the tokens where `mask` is set.

    token-mean: every token of the batch weighs the same (long answers weigh more);
    seq-mean-token-sum: sum per sequence, mean over sequences (Dr. GRPO's unbiased form, up to a
    constant); seq-mean-token-mean: mean per sequence, then over sequences (the original GRPO).
    """
    mask = mask.to(values.dtype)
    if agg == "token-mean":
        return (values * mask).sum() / mask.sum().clamp(min=1)
    per_sequence = (values * mask).sum(-1)
    if agg == "seq-mean-token-mean":
        per_sequence = per_sequence / mask.sum(-1).clamp(min=1)
    elif agg != "seq-mean-token-sum":
        raise ValueError(f"algo.loss_agg={agg!r} is not one of {', '.join(AGGREGATIONS)}")
    has_tokens = (mask.sum(-1) > 0).to(values.dtype)
    return (per_sequence * has_tokens).sum() / has_tokens.sum().clamp(min=1)


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                clip_low: float = 0.2, clip_high: float = 0.28, rollout_logp: torch.Tensor | None = None,
                tis_cap: float = 2.0, tis_mode: str = "truncate",
                agg: str = "token-mean") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clip policy-gradient loss with truncated importance sampling.

    logp, old_logp, rollout_logp, mask: [B, T] (log-probs of the response tokens under the
    current policy, the policy that sampled this batch as recomputed by the trainer, and the
    rollout engine); advantages: [B], one per sequence. Returns (loss, stats) with detached
    stats: clip fraction, mean ratio, and the TIS weight mean and capped fraction.
    """
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"algo.clip_low={clip_low} and algo.clip_high={clip_high} must be >= 0")
    if tis_cap <= 0:
        raise ValueError(f"algo.tis_cap={tis_cap} must be > 0")
    if tis_mode not in TIS_MODES:
        raise ValueError(f"algo.tis_mode={tis_mode!r} is not one of {', '.join(TIS_MODES)}")
    advantages = advantages[:, None]
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    maskf = mask.to(per_token.dtype)
    tokens = maskf.sum().clamp(min=1)
    stats = {"clip_fraction": ((clipped > unclipped).to(maskf.dtype) * maskf).sum() / tokens,
             "ratio_mean": (ratio.detach() * maskf).sum() / tokens}
    if rollout_logp is not None:
        weight = torch.exp(old_logp - rollout_logp).detach()
        capped = weight > tis_cap
        weight = weight.clamp(max=tis_cap) if tis_mode == "truncate" else weight.masked_fill(capped, 0.0)
        per_token = per_token * weight
        stats["tis_weight_mean"] = (weight * maskf).sum() / tokens
        stats["tis_capped_fraction"] = (capped.to(maskf.dtype) * maskf).sum() / tokens
    return aggregate(per_token, mask, agg), {name: value.detach() for name, value in stats.items()}


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman's k1, k2, k3).

    k1 = log(pi / pi_ref) is unbiased but high-variance and can be negative; k2 = (log ratio)^2 / 2
    is low-variance but biased; k3 = r - log r - 1 with r = pi_ref / pi is unbiased, low-variance
    and never negative, hence the default.
    """
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio ** 2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"algo.kl_estimator={estimator!r} is not one of {', '.join(KL_ESTIMATORS)}")


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim, computed without forming log(0)."""
    logits = logits.float()
    logz = torch.logsumexp(logits, dim=-1, keepdim=True)
    probs = torch.exp(logits - logz)
    return logz.squeeze(-1) - (probs * logits).sum(-1)


def self_certainty_from_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Intuitor's self-certainty per sequence: mean over response tokens of KL(U || p).

    KL(U || p) = -log V - mean_v log p_v: how far the next-token distribution is from uniform.
    logits [B, T, V], mask [B, T] -> [B].
    """
    logits = logits.float()
    vocab = logits.shape[-1]
    mean_logprob = logits.mean(-1) - torch.logsumexp(logits, dim=-1)
    per_token = -math.log(vocab) - mean_logprob
    maskf = mask.to(per_token.dtype)
    return (per_token * maskf).sum(-1) / maskf.sum(-1).clamp(min=1)
