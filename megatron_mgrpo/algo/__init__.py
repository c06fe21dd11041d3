"""The M-GRPO algorithm as pure, batched torch functions (no I/O, no distributed calls)."""

from megatron_mgrpo.algo.advantages import group_advantages
from megatron_mgrpo.algo.ema import ema_update_, momentum_at
from megatron_mgrpo.algo.entropy import entropy_from_logits, self_certainty_from_logits
from megatron_mgrpo.algo.entropy_filter import iqr_keep_mask, iqr_threshold
from megatron_mgrpo.algo.kl import kl_penalty
from megatron_mgrpo.algo.losses import aggregate, aggregation_units, policy_loss

__all__ = ["aggregate", "aggregation_units", "ema_update_", "entropy_from_logits", "group_advantages", "iqr_keep_mask",
           "iqr_threshold", "kl_penalty", "momentum_at", "policy_loss", "self_certainty_from_logits"]
