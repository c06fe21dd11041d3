"""The policy pool and the momentum pool: who samples the M and the N responses of a prompt.

The momentum samples must really come from the EMA weights: that is the whole point of M-GRPO,
and an implementation that quietly draws them from the policy still "works" while being plain
self-consistency RL. Keeping the two pools as separate objects, each with its own weights
version, makes the provenance of every sample checkable.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import torch

from megatron_mgrpo.rollout.types import RolloutEngine, Sample, SamplingParams

#: How a launcher that started the servers itself tells the trainer where each pool is:
#: comma-separated http://HOST:PORT URLs, one per engine.
URLS_ENV = {"policy": "MGRPO_POLICY_URLS", "momentum": "MGRPO_MOMENTUM_URLS"}


class GroupPush(Protocol):
    """One push to several engines together (`rollout.pool_push.DistributedPoolPush`: SGLang
    servers sharing a weight group, one broadcast per bucket for all of them)."""

    engines: list[RolloutEngine]

    def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None: ...


class EnginePool:
    """Several engines holding the same weights; prompts are spread over them evenly.

    How new weights reach the engines is given, not chosen here, so that the pool knows no
    concrete engine: `push` (from `rollout.pool_push.pool_weight_push`, for SGLang servers that
    share a weight group) updates the engines it covers together, and every other engine is
    updated on its own.
    """

    def __init__(self, name: str, engines: Sequence[RolloutEngine], push: GroupPush | None = None):
        if not engines:
            raise ValueError(f"the {name} pool needs at least one engine")
        self.name = name
        self.engines = list(engines)
        if push is not None and any(engine not in self.engines for engine in push.engines):
            raise ValueError(f"the {name} pool's group push covers engines that are not in the pool")
        self.group_push = push
        # a generate call and a weight push never overlap (a producer thread may generate while the
        # trainer pushes): new weights land between requests, and `version` is that of every sample;
        # a push also waits until every gate allows it (a producer that still has to sample on the
        # weights held now), so that what is sampled on which weights never depends on timing
        self.version = 0
        self.updated = threading.Condition()
        self.gates: list[Callable[[], bool]] = []

    def generate(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingParams) -> list[list[Sample]]:
        """n samples per prompt, returned per prompt in input order."""
        if n == 0:
            return [[] for _ in prompts]
        with self.updated:
            return self._generate(prompts, n, sampling)

    def _generate(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingParams) -> list[list[Sample]]:
        shards = [list(range(i, len(prompts), len(self.engines))) for i in range(len(self.engines))]
        work = [(engine, shard) for engine, shard in zip(self.engines, shards) if shard]

        def run(engine: RolloutEngine, shard: list[int]) -> list[Sample]:
            return engine.generate([prompts[i] for i in shard], n, sampling)

        if len(work) == 1:
            results = [run(*work[0])]
        else:  # server engines block on HTTP, so threads overlap them
            with ThreadPoolExecutor(len(work)) as executor:
                results = list(executor.map(lambda job: run(*job), work))
        grouped: list[list[Sample]] = [[] for _ in prompts]
        for (_, shard), samples in zip(work, results):
            for sample in samples:
                sample.prompt_index = shard[sample.prompt_index]
                grouped[sample.prompt_index].append(sample)
        return grouped

    def update_weights(self, named_tensors_factory, version: int) -> None:
        """Push weights to every engine: those of the weight group together, the others one by
        one; `named_tensors_factory()` yields a fresh iterator each call."""
        together = self.group_push.engines if self.group_push else []
        with self.updated:
            self.updated.wait_for(lambda: all(gate() for gate in self.gates))
            for engine in self.engines:
                if engine not in together:
                    engine.update_weights(named_tensors_factory(), version)
            if self.group_push:
                self.group_push.push(named_tensors_factory(), version)
            self.version = version
            self.updated.notify_all()


class RolloutPools:
    """The policy pool samples M per prompt, the momentum pool N (absent for label sources without it)."""

    def __init__(self, policy: EnginePool, momentum: EnginePool | None = None):
        self.policy = policy
        self.momentum = momentum

    def sample(self, prompts: Sequence[Sequence[int]], m: int, n: int, sampling: SamplingParams,
               momentum_sampling: SamplingParams | None = None) -> tuple[list[list[Sample]], list[list[Sample]]]:
        """M policy and N momentum samples per prompt. Both pools are asked at once when both are
        servers (the momentum pool would otherwise idle while the policy pool generates, and the
        other way round); in-process engines take turns."""
        if n > 0 and self.momentum is None:
            raise ValueError(f"{n} momentum samples per prompt were asked for, but there is no momentum pool: "
                             f"build RolloutPools with momentum engines (reward.label_source=mgrpo needs them)")
        if n == 0:
            return self.policy.generate(prompts, m, sampling), [[] for _ in prompts]
        momentum_sampling = momentum_sampling or sampling
        if any(engine.in_process for engine in (*self.policy.engines, *self.momentum.engines)):
            return (self.policy.generate(prompts, m, sampling),
                    self.momentum.generate(prompts, n, momentum_sampling))
        with ThreadPoolExecutor(2) as executor:
            momentum = executor.submit(self.momentum.generate, prompts, n, momentum_sampling)
            return self.policy.generate(prompts, m, sampling), momentum.result()
