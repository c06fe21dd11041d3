"""The M-GRPO algorithm as pure, batched torch functions (no I/O, no distributed calls)."""

from megatron_mgrpo.algo.advantages import group_advantages
from megatron_mgrpo.algo.ema import ema_update_
from megatron_mgrpo.algo.entropy_filter import IQRFilter, iqr_filter, trajectory_entropy
from megatron_mgrpo.algo.losses import (aggregate, entropy_from_logits, kl_penalty, policy_loss,
                                        self_certainty_from_logits)

__all__ = ["IQRFilter", "aggregate", "ema_update_", "entropy_from_logits", "group_advantages", "iqr_filter",
           "kl_penalty", "policy_loss", "self_certainty_from_logits", "trajectory_entropy"]
