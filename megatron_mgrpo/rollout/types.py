"""The data every rollout engine speaks: sampling settings in, `Sample`s out."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to sample.

    Engines report each token's log-prob under the distribution it was actually drawn from:
    temperature-scaled, then top-k / top-p truncated and renormalised (vLLM's
    `processed_logprobs`). That is the behaviour policy, the right denominator for importance
    sampling; with top-k and top-p off (the M-GRPO recipe) it equals the tempered log-prob the
    trainer computes.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"sampling temperature={self.temperature} must be > 0 (set rollout.temperature)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling top_p={self.top_p} must be in (0, 1] (set rollout.top_p)")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"sampling top_k={self.top_k} must be -1 (off) or >= 1 (set rollout.top_k)")
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling max_new_tokens={self.max_new_tokens} must be >= 1 "
                             f"(set rollout.max_new_tokens)")


@dataclass
class Sample:
    """One sampled response. `logprobs[i]` is the engine's log-prob of `response_ids[i]`.

    `finish_reason` is "stop" (end-of-sequence token or a stop string) or "length" (hit
    max_new_tokens). `weights_version` says which pushed weights produced it, so a stale sample
    can never be mistaken for a fresh one. `routed_experts` (MoE engines that report routing)
    holds one [tokens, top_k] expert-id list per layer for routing replay in training.
    """

    prompt_index: int
    prompt_ids: list[int]
    response_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str
    weights_version: int
    routed_experts: list[Any] | None = field(default=None, repr=False)


@runtime_checkable
class RolloutEngine(Protocol):
    """What the trainer needs from anything that samples. `in_process`: it computes in this
    process (its calls share this process's CPU threads and RNG, so they are not overlapped with
    another engine's); a server engine only waits on the network."""

    in_process: bool

    def generate(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingParams) -> list[Sample]:
        """n samples for each prompt (token ids), grouped prompt by prompt in input order."""

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Load HF-named full tensors in place and tag later samples with `version`."""

    def health(self) -> dict[str, Any]:
        """A small status dict; raises if the engine cannot serve."""

    def shutdown(self) -> None:
        """Release the model / stop the server. Idempotent."""
