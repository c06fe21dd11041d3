"""Asynchronous rollout: what a producer generates on which weights, and what it hands over."""

import pytest

from megatron_mgrpo.rollout.pools import EnginePool
from megatron_mgrpo.rollout.producer import RolloutProducer, required_version
from megatron_mgrpo.rollout.types import Sample, SamplingParams


class VersionedEngine:
    """A server-like engine whose samples carry its weights version; `fail_at` raises at that step."""

    in_process = False

    def __init__(self, fail_at=None, restarted_at=None):
        self.weights_version, self.fail_at, self.restarted_at, self.calls = 0, fail_at, restarted_at, []

    def generate(self, prompts, n, sampling):
        if sampling.seed == self.fail_at:
            raise RuntimeError("server gone")
        version = self.weights_version
        if sampling.seed == self.restarted_at:  # once: lost its weights, answers on the base model
            version, self.restarted_at = 0, None
        self.calls.append((sampling.seed, version))
        return [Sample(prompt_index=i, prompt_ids=list(p), response_ids=[7], text="", logprobs=[0.0],
                       finish_reason="stop", weights_version=version)
                for i, p in enumerate(prompts) for _ in range(n)]

    def update_weights(self, named_tensors, version):
        self.weights_version = version


def producer(engine, bound, start=0, end=6, sync_interval=1):
    pool = EnginePool("policy", [engine])
    generate = lambda step: pool.generate([[1], [2]], 2, SamplingParams(seed=step))  # seed names the step
    return pool, RolloutProducer(pool, generate, bound=bound, start=start, end=end, sync_interval=sync_interval)


def push(pool, version):
    pool.update_weights(lambda: iter([]), version)


def test_required_version_is_the_synchronous_push_bound_steps_earlier():
    assert [required_version(t, 0) for t in range(5)] == [0, 1, 2, 3, 4]
    assert [required_version(t, 1) for t in range(5)] == [0, 0, 1, 2, 3]
    assert [required_version(t, 0, sync_interval=3) for t in range(7)] == [0, 0, 0, 3, 3, 3, 6]
    assert [required_version(t, 2, sync_interval=3) for t in range(7)] == [0, 0, 0, 0, 0, 3, 3]


@pytest.mark.parametrize("bound", [0, 1, 2])
def test_a_step_is_made_on_the_oldest_weights_the_bound_allows_and_never_older(bound):
    """The trainer's loop: take step t, train, push version t + 1, here with no time between them.
    The push waits until the producer has made every step due on the weights it replaces, so
    step t is generated on version max(0, t - bound) exactly, whatever the timing."""
    engine = VersionedEngine()
    pool, made = producer(engine, bound)
    push(pool, 0)
    for step in range(6):
        samples = made.take(step)
        assert all(step - s.weights_version <= bound for group in samples for s in group)
        push(pool, step + 1)
    made.close()
    assert engine.calls == [(step, max(0, step - bound)) for step in range(6)]
    assert made.regenerated == 0


def test_a_sample_older_than_the_bound_is_never_handed_over():
    """An engine that comes back from a restart on its base weights after the push: its samples of
    step 2 are version 0 where 2 is required, so the step is made again on the pushed weights."""
    engine = VersionedEngine(restarted_at=2)
    pool, made = producer(engine, bound=0, end=3)
    for step in range(3):
        push(pool, step)
        samples = made.take(step)
        assert {s.weights_version for group in samples for s in group} == {step}
    made.close()
    assert made.regenerated == 1 and [call for call in engine.calls if call[0] == 2] == [(2, 0), (2, 2)]


def test_a_generate_error_reaches_the_trainer():
    engine = VersionedEngine(fail_at=1)
    pool, made = producer(engine, bound=1, end=4)
    push(pool, 0)
    made.take(0)
    with pytest.raises(RuntimeError, match="server gone"):
        made.take(1)
    made.close()
