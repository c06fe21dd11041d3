"""Asynchronous rollout: one pool's samples for the coming steps, made while the trainer trains.

A producer thread walks the steps in order and generates step t's samples as soon as its pool
holds weights recent enough for t: version >= `required_version(t)`, which for a bound k is the
version the synchronous step would sample with, k steps earlier. Versions count the trainer's
pushes: the weights pushed after step t - 1 are version t, so the policy trained at step t is
version t and a sample's staleness is t - its `weights_version`. With k = 0 the producer waits
for the synchronous step's own weights (it only overlaps the two pools); with k = 1 it makes
step t + 1's samples on version t while step t trains. Weights land between requests
(`EnginePool` never pushes while it generates), so every sample's version is exact.

`take(t)` checks what it returns: a sample older than the bound (an engine that came back from a
restart with older weights, say) is never trained on; the step's samples are generated again
on the pool's current weights, and `regenerated` counts it. The old log-probs of an update come
from the trainer's own scoring pass, so a stale sample is weighed against the current policy
(PPO ratio) and against the engine that made it (TIS): the correction is explicit, never implied.

A producer lives in memory only: after a crash the run resumes with fresh producers at the
restored step, on engines pushed the restored weights, so no sample made before the crash is
trained on.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from megatron_mgrpo.rollout.pools import EnginePool
from megatron_mgrpo.rollout.types import Sample


def required_version(step: int, bound: int, sync_interval: int = 1) -> int:
    """The oldest weights version step `step` may sample with: the push the synchronous step would
    have at step - bound (pushes happen every `sync_interval` steps, at versions divisible by it)."""
    earlier = max(0, step - bound)
    return earlier - earlier % sync_interval


class RolloutProducer:
    """Generates `generate(step)` for steps start, start + 1, ... < end in a thread, each once its
    pool's weights are recent enough."""

    def __init__(self, pool: EnginePool, generate: Callable[[int], list[list[Sample]]], *, bound: int,
                 start: int, end: int, sync_interval: int = 1):
        self.pool, self.generate = pool, generate
        self.bound, self.sync_interval = bound, sync_interval
        self.regenerated = 0
        self._results: dict[int, list[list[Sample]] | BaseException] = {}
        self._ready = threading.Condition()
        self._stop = threading.Event()
        self._first, self._next, self._end = start, start, end  # _next: the next step to generate
        pool.gates.append(self._may_push)
        self._thread = threading.Thread(target=self._run, args=(start, end), name=f"rollout-{pool.name}",
                                        daemon=True)
        self._thread.start()

    def required(self, step: int) -> int:
        return required_version(step, self.bound, self.sync_interval)

    def take(self, step: int) -> list[list[Sample]]:
        """Step `step`'s samples, none older than the bound allows (regenerated if one is)."""
        if not self._first <= step < self._end:
            raise ValueError(f"step {step} is outside the steps {self._first}..{self._end - 1} this producer makes")
        with self._ready:
            self._ready.wait_for(lambda: step in self._results)
            result = self._results.pop(step)
        if isinstance(result, BaseException):
            raise result
        if any(s.weights_version < self.required(step) for group in result for s in group):
            self.regenerated += 1
            result = self.generate(step)
        return result

    def close(self) -> None:
        """Stop after the request in flight; nothing it made afterwards is used."""
        self._stop.set()
        with self.pool.updated:
            self.pool.updated.notify_all()
        self._thread.join()
        self.pool.gates.remove(self._may_push)

    def _may_push(self) -> bool:
        """Whether the pool may take new weights: this producer has sampled every step due on the
        weights it holds now (or is done), so each step is sampled on exactly the version its
        bound names, however the threads are timed."""
        return (self._stop.is_set() or self._next >= self._end
                or self.required(self._next) > self.pool.version)

    def _run(self, start: int, end: int) -> None:
        for step in range(start, end):
            with self.pool.updated:
                self.pool.updated.wait_for(lambda: self._stop.is_set() or self.pool.version >= self.required(step))
            if self._stop.is_set():
                return
            try:
                result = self.generate(step)
            except BaseException as err:  # handed to the trainer, which raises it in its own thread
                result = err
                self._stop.set()
            with self._ready:
                self._results[step] = result
                self._ready.notify_all()
            with self.pool.updated:
                self._next = step + 1
                self.pool.updated.notify_all()
            if isinstance(result, BaseException):
                return
