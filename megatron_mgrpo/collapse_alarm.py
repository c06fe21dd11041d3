"""Early warning of self-reward collapse from label-free signals only (gold is never read)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple


class CollapseAlarm(NamedTuple):
    alarm: bool
    reasons: list[str]


def collapse_alarm(history: Sequence[Mapping[str, Any]], window: int = 10, kl_ceiling: float = 0.2,
                   agreement_drop: float = 0.2) -> CollapseAlarm:
    """Whether the run shows signs of self-reward collapse, and why (label-free signals only).

    Self-rewarding RL has no outside check: every step pushes the policy further the way it
    already leans, right or wrong, and what gives a collapse away without labels is how far the
    policy walks from where it started. Either of two signals fires the alarm:

    - drift: the median `kl/mean` (KL to the warm-started policy, algo.kl_reference=initial) over
      the last `window` steps >= `kl_ceiling` nats/token; the median ignores one step's spike;
    - anchor split (M-GRPO): the mean `label/agreement` (policy vote == momentum vote) over the
      last `window` steps is `agreement_drop` below its mean over the first `window` steps: the
      momentum model is a slow average of the policy, so their votes part when it runs away.

    Drift is judged from `window` steps on, the split from 2 x `window`. The thresholds and why
    the rule reads nothing else (entropy, vote share, length, reward) are calibrated in
    benchmarks/RESULTS.md ("Collapse alarm"): a starting point, not a law, on other tasks.
    """
    if len(history) < window:
        return CollapseAlarm(False, [])
    recent = history[-window:]
    reasons = []
    kl = _values(recent, "kl/mean")
    if kl and (drift := statistics.median(kl)) >= kl_ceiling:
        reasons.append(f"KL to the initial policy reached {drift:.3g} nats/token "
                       f"({window}-step median >= {kl_ceiling})")
    if len(history) >= 2 * window:
        before, after = _mean(history[:window], "label/agreement"), _mean(recent, "label/agreement")
        if before is not None and after is not None and after <= before - agreement_drop:
            reasons.append(f"policy/momentum vote agreement fell to {after:.2f} from {before:.2f} "
                           f"(drop >= {agreement_drop})")
    return CollapseAlarm(bool(reasons), reasons)


def _values(records: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    return [float(r[key]) for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]


def _mean(records: Sequence[Mapping[str, Any]], key: str) -> float | None:
    values = _values(records, key)
    return statistics.fmean(values) if values else None
