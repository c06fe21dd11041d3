import pytest
import torch

from megatron_mgrpo.rollout import SamplingParams
from megatron_mgrpo.rollout.hf_engine import HFEngine
from megatron_mgrpo.rollout.pool_push import pool_weight_push
from megatron_mgrpo.rollout.pools import EnginePool, RolloutPools
from megatron_mgrpo.rollout.types import Sample
from tests.helpers import teacher_forced_logprobs


def test_momentum_samples_come_from_momentum_weights(make_tiny_qwen3, tokenizer):
    policy_model, momentum_model = make_tiny_qwen3(seed=0), make_tiny_qwen3(seed=1)
    pools = RolloutPools(EnginePool("policy", [HFEngine(policy_model, tokenizer, seed=1)]),
                         EnginePool("momentum", [HFEngine(momentum_model, tokenizer, seed=2)]))
    prompts = [tokenizer.encode(q) for q in ("2+2=", "3*3=", "10-4=")]
    policy, momentum = pools.sample(prompts, m=3, n=2, sampling=SamplingParams(max_new_tokens=8))
    assert [len(g) for g in policy] == [3, 3, 3] and [len(g) for g in momentum] == [2, 2, 2]
    for source, other, groups in ((momentum_model, policy_model, momentum), (policy_model, momentum_model, policy)):
        for index, group in enumerate(groups):
            for s in group:
                assert s.prompt_index == index and s.prompt_ids == prompts[index]
                mine = torch.tensor(s.logprobs)
                assert torch.allclose(mine, teacher_forced_logprobs(source, s, 1.0), atol=1e-5)
                assert not torch.allclose(mine, teacher_forced_logprobs(other, s, 1.0), atol=1e-3)


def test_prompts_spread_over_engines_keep_their_order(make_tiny_qwen3, tokenizer):
    model = make_tiny_qwen3()
    pool = EnginePool("policy", [HFEngine(model, tokenizer, seed=s) for s in range(3)])
    prompts = [tokenizer.encode(f"{i}+{i}=") for i in range(7)]
    groups = pool.generate(prompts, 2, SamplingParams(max_new_tokens=3))
    assert [[s.prompt_ids for s in g] for g in groups] == [[p, p] for p in prompts]
    assert all(s.prompt_index == i for i, g in enumerate(groups) for s in g)


def test_pushes_reach_every_engine_with_the_version(make_tiny_qwen3, tokenizer):
    target = make_tiny_qwen3(seed=5)
    engines = [HFEngine(make_tiny_qwen3(seed=s), tokenizer) for s in range(2)]
    EnginePool("momentum", engines).update_weights(lambda: iter(target.state_dict().items()), version=3)
    for engine in engines:
        assert engine.weights_version == 3
        assert torch.equal(engine.model.lm_head.weight, target.lm_head.weight)


def test_momentum_samples_without_a_momentum_pool_is_an_error(make_tiny_qwen3, tokenizer):
    pools = RolloutPools(EnginePool("policy", [HFEngine(make_tiny_qwen3(), tokenizer)]))
    with pytest.raises(ValueError, match="no momentum pool"):
        pools.sample([[5]], m=2, n=1, sampling=SamplingParams(max_new_tokens=2))
    policy, momentum = pools.sample([[5]], m=2, n=0, sampling=SamplingParams(max_new_tokens=2))
    assert len(policy[0]) == 2 and momentum == [[]]


class Recorder:
    """Stands in for an engine or a group push: records the versions it was pushed."""

    def __init__(self, engines=()):
        self.engines, self.pushed = list(engines), []

    def update_weights(self, named_tensors, version):
        self.pushed.append((dict(named_tensors), version))

    push = update_weights


def test_a_group_push_updates_its_engines_together_and_the_others_one_by_one():
    alone, grouped = Recorder(), [Recorder(), Recorder()]
    group = Recorder(grouped)
    EnginePool("policy", [grouped[0], alone, grouped[1]], push=group).update_weights(lambda: iter([("w", 1)]), 4)
    assert alone.pushed == group.pushed == [({"w": 1}, 4)] and grouped[0].pushed == grouped[1].pushed == []
    with pytest.raises(ValueError, match="covers engines that are not in the pool"):
        EnginePool("momentum", [alone], push=group)


def test_only_sglang_servers_in_a_weight_group_get_a_group_push(make_tiny_qwen3, tokenizer):
    assert pool_weight_push([HFEngine(make_tiny_qwen3(), tokenizer)]) is None


class Rendezvous:
    """An engine whose generate waits (up to 5 s) for the other pool's engine to be generating too."""

    def __init__(self, started, other_started, in_process: bool):
        self.started, self.other_started, self.in_process = started, other_started, in_process
        self.overlapped = None

    def generate(self, prompts, n, sampling):
        self.started.set()
        self.overlapped = self.other_started.wait(timeout=0.2 if self.in_process else 5)
        return [Sample(prompt_index=i, prompt_ids=list(p), response_ids=[1], text="", logprobs=[0.0],
                       finish_reason="stop", weights_version=sampling.seed) for i, p in enumerate(prompts)
                for _ in range(n)]


@pytest.mark.parametrize("in_process", [False, True], ids=["servers", "in-process"])
def test_server_pools_sample_at_once_and_in_process_ones_take_turns(in_process):
    import threading

    policy_started, momentum_started = threading.Event(), threading.Event()
    policy = Rendezvous(policy_started, momentum_started, in_process)
    momentum = Rendezvous(momentum_started, policy_started, in_process)
    pools = RolloutPools(EnginePool("policy", [policy]), EnginePool("momentum", [momentum]))
    mine, theirs = pools.sample([[5], [6]], m=3, n=1, sampling=SamplingParams(seed=1),
                                momentum_sampling=SamplingParams(seed=2))
    assert [len(g) for g in mine] == [3, 3] and [len(g) for g in theirs] == [1, 1]
    assert {s.weights_version for g in mine for s in g} == {1} and {s.weights_version for g in theirs for s in g} == {2}
    assert policy.overlapped == (not in_process)  # taking turns, the policy pool samples first, alone
