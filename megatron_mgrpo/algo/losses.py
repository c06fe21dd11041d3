"""The policy-gradient loss: PPO-clip surrogate with truncated importance sampling, token-level.

In the on-policy case (one optimizer step per rollout batch) `old_logp` is `logp.detach()`,
the ratio is 1 and the gradient is exactly REINFORCE with group advantages; the clip only acts
when a rollout batch is split over several optimizer steps. Truncated importance sampling
corrects for the rollout engine sampling with other numerics than the trainer (other kernels,
bf16 / FP8 weights): each token is weighted by w = pi_old(y) / pi_rollout(y), capped, which
keeps the gradient consistent while the mismatch is small and bounded when it is not.
"""

from __future__ import annotations

import torch

from megatron_mgrpo.config import LOSS_AGGREGATIONS, TIS_MODES


def aggregate(values: torch.Tensor, mask: torch.Tensor, agg: str = "token-mean") -> torch.Tensor:
    """Reduce per-token values [B, T] over the tokens where `mask` is set.

    token-mean: every token of the batch weighs the same (long answers weigh more);
    seq-mean-token-sum: sum per sequence, mean over sequences (Dr. GRPO's length-unbiased form,
    up to a constant); seq-mean-token-mean: mean per sequence, then over sequences (the original
    GRPO). Sequences without tokens do not count. Values outside the mask are ignored, even
    if they are NaN or infinite.
    """
    if agg not in LOSS_AGGREGATIONS:
        raise ValueError(f"algo.loss_agg={agg!r} is not one of {', '.join(LOSS_AGGREGATIONS)}")
    valid = mask.bool()
    values = torch.where(valid, values, 0)
    if agg == "token-mean":
        return values.sum() / valid.sum().clamp(min=1)
    tokens = valid.sum(-1)
    per_sequence = values.sum(-1)
    if agg == "seq-mean-token-mean":
        per_sequence = per_sequence / tokens.clamp(min=1)
    return per_sequence.sum() / (tokens > 0).sum().clamp(min=1)


def aggregation_units(mask: torch.Tensor, agg: str = "token-mean") -> int:
    """How many units `aggregate` averages over: response tokens for token-mean, sequences with
    tokens otherwise. A loss summed over micro-batches as mean x units and divided by the total
    units equals `aggregate` over the whole batch, however it was split."""
    if agg not in LOSS_AGGREGATIONS:
        raise ValueError(f"algo.loss_agg={agg!r} is not one of {', '.join(LOSS_AGGREGATIONS)}")
    valid = mask.bool()
    return int(valid.sum()) if agg == "token-mean" else int(valid.any(-1).sum())


def _check_settings(clip_low: float, clip_high: float, tis_cap: float, tis_mode: str) -> None:
    if not 0 <= clip_low < 1:
        raise ValueError(f"algo.clip_low={clip_low} must be in [0, 1): the ratio is clipped at 1 - clip_low")
    if clip_high < 0:
        raise ValueError(f"algo.clip_high={clip_high} must be >= 0: the ratio is clipped at 1 + clip_high")
    if tis_cap <= 0:
        raise ValueError(f"algo.tis_cap={tis_cap} must be > 0 (typical: 2)")
    if tis_mode not in TIS_MODES:
        raise ValueError(f"algo.tis_mode={tis_mode!r} is not one of {', '.join(TIS_MODES)}")


def _check_shapes(logp: torch.Tensor, advantages: torch.Tensor, **per_token: torch.Tensor | None) -> None:
    if logp.dim() != 2:
        raise ValueError(f"logp must be [batch, tokens], got shape {tuple(logp.shape)}")
    for name, tensor in per_token.items():
        if tensor is not None and tensor.shape != logp.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)} but logp has {tuple(logp.shape)}")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages must be one per sequence, shape ({logp.shape[0]},), "
                         f"got {tuple(advantages.shape)}")


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                clip_low: float = 0.2, clip_high: float = 0.28, rollout_logp: torch.Tensor | None = None,
                tis_cap: float = 2.0, tis_mode: str = "truncate",
                agg: str = "token-mean") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clip policy-gradient loss with truncated importance sampling.

    logp, old_logp, rollout_logp, mask: [B, T]: log-probs of the sampled tokens under the
    policy being trained, under the policy that sampled the batch (as recomputed by the
    trainer), and as reported by the rollout engine; advantages: [B], one per sequence.
    TIS weights w = exp(old_logp - rollout_logp), detached; `truncate` uses min(w, tis_cap),
    `mask` gives tokens with w > tis_cap weight 0. Positions outside `mask` may hold anything
    (padding); they reach neither the loss nor the gradient.

    Returns (loss, stats), stats detached: clip_fraction (tokens whose gradient the clip
    zeroes), ratio_mean, and with rollout_logp tis_weight_mean (of the applied weights) and
    tis_capped_fraction (tokens with w > tis_cap).
    """
    _check_settings(clip_low, clip_high, tis_cap, tis_mode)
    _check_shapes(logp, advantages, old_logp=old_logp, mask=mask, rollout_logp=rollout_logp)
    valid = mask.bool()
    # zero the log-ratio on padding before exp, so garbage there cannot overflow into NaN gradients
    ratio = torch.exp(torch.where(valid, logp - old_logp, 0))
    advantages = advantages[:, None]
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    tokens = valid.sum().clamp(min=1)

    def token_mean(values: torch.Tensor) -> torch.Tensor:
        return torch.where(valid, values.detach().float(), 0).sum() / tokens

    stats = {"clip_fraction": token_mean(clipped > unclipped), "ratio_mean": token_mean(ratio)}
    if rollout_logp is not None:
        weight = torch.exp(torch.where(valid, old_logp - rollout_logp, 0)).detach()
        capped = weight > tis_cap
        weight = weight.clamp(max=tis_cap) if tis_mode == "truncate" else weight.masked_fill(capped, 0)
        per_token = per_token * weight
        stats |= {"tis_weight_mean": token_mean(weight), "tis_capped_fraction": token_mean(capped)}
    return aggregate(per_token, valid, agg), stats
