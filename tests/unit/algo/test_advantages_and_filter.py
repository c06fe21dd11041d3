import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from megatron_mgrpo.algo import group_advantages, iqr_filter, trajectory_entropy

rewards_st = st.lists(st.lists(st.sampled_from([0.0, 1.0]), min_size=1, max_size=12), min_size=1, max_size=5)


def pad(rows):
    width = max(len(r) for r in rows)
    rewards = torch.tensor([r + [0.0] * (width - len(r)) for r in rows])
    keep = torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in rows])
    return rewards, keep


def test_grpo_by_hand():
    # 4 kept responses, rewards 1 1 0 0: mean 0.5, sample std sqrt(1/3)
    adv = group_advantages(torch.tensor([[1.0, 1.0, 0.0, 0.0]]), torch.ones(1, 4, dtype=torch.bool), eps=0.0)
    assert torch.allclose(adv, torch.tensor([[1, 1, -1, -1]]) * 0.5 / math.sqrt(1 / 3))


def test_rloo_and_drgrpo_by_hand():
    rewards, keep = torch.tensor([[1.0, 0.0, 0.0]]), torch.ones(1, 3, dtype=torch.bool)
    # leave-one-out: 1 - 0 = 1, 0 - 0.5 = -0.5
    assert torch.allclose(group_advantages(rewards, keep, "rloo"), torch.tensor([[1.0, -0.5, -0.5]]))
    assert torch.allclose(group_advantages(rewards, keep, "drgrpo"), torch.tensor([[2 / 3, -1 / 3, -1 / 3]]))


def test_dropped_responses_do_not_count():
    rewards = torch.tensor([[1.0, 0.0, 1.0, 1.0]])
    keep = torch.tensor([[True, True, False, False]])
    adv = group_advantages(rewards, keep, "drgrpo")
    assert torch.allclose(adv, torch.tensor([[0.5, -0.5, 0.0, 0.0]]))


@pytest.mark.parametrize("rewards, keep", [
    ([[1.0, 1.0, 1.0]], [[True, True, True]]),   # unanimous: no signal
    ([[1.0, 0.0, 1.0]], [[True, False, False]]),  # one kept response: no group
    ([[1.0, 0.0]], [[False, False]]),             # everything dropped
])
def test_degenerate_groups_get_zero(rewards, keep):
    for estimator in ("grpo", "drgrpo", "rloo"):
        assert (group_advantages(torch.tensor(rewards), torch.tensor(keep), estimator) == 0).all()


@settings(max_examples=60, deadline=None)
@given(rows=rewards_st, estimator=st.sampled_from(["grpo", "drgrpo", "rloo"]))
def test_advantages_sum_to_zero_and_are_permutation_equivariant(rows, estimator):
    rewards, keep = pad(rows)
    adv = group_advantages(rewards, keep, estimator)
    assert torch.allclose(adv.sum(-1), torch.zeros(len(rows)), atol=1e-4)
    assert (adv[~keep] == 0).all()
    perm = torch.randperm(rewards.shape[1])
    assert torch.allclose(group_advantages(rewards[:, perm], keep[:, perm], estimator), adv[:, perm], atol=1e-6)
    if estimator == "grpo":  # correct responses always get positive advantage, wrong ones negative
        assert (adv[(rewards == 1) & keep] >= 0).all() and (adv[(rewards == 0) & keep] <= 0).all()


def test_unknown_estimator_names_the_key():
    with pytest.raises(ValueError, match="algo.advantage_estimator='ppo'"):
        group_advantages(torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), "ppo")


def test_trajectory_entropy_is_the_mean_over_response_tokens():
    token_entropy = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0], [1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    h = trajectory_entropy(token_entropy, mask)
    assert h[:2].tolist() == [2.0, 4.0] and math.isnan(h[2])


def test_iqr_filter_by_hand():
    # sorted, n = 8: Q1 sits at position 0.25 * 7 = 1.75 -> 1.3 + 0.75 * (1.8 - 1.3) = 1.675;
    # Q3 at 5.25 -> 2.0 + 0.25 * (2.4 - 2.0) = 2.1; T = 1.675 - 0.75 * 0.425 = 1.35625
    entropy = torch.tensor([[0.1, 1.3, 1.8, 2.0, 2.0, 2.0, 2.4, 3.0]])
    result = iqr_filter(entropy, k=0.75)
    q1, q3 = torch.quantile(entropy, torch.tensor([0.25, 0.75]), dim=-1)
    assert torch.allclose(q1, torch.tensor([1.675])) and torch.allclose(q3, torch.tensor([2.1]))
    assert torch.allclose(result.threshold, torch.tensor([1.35625]))
    assert result.keep.tolist() == [[False, False, True, True, True, True, True, True]]
    assert result.dropped == 2


def test_iqr_filter_edge_cases():
    equal = iqr_filter(torch.full((2, 5), 0.7))
    assert equal.keep.all() and equal.dropped == 0
    for g in (1, 2):
        assert iqr_filter(torch.rand(3, g)).keep.all()
    with_nan = iqr_filter(torch.tensor([[1.0, float("nan"), 1.1, 0.9], [float("nan")] * 4]))
    assert with_nan.keep.tolist() == [[True, False, True, True], [False] * 4]
    assert with_nan.dropped == 5
    with pytest.raises(ValueError, match="algo.iqr_k"):
        iqr_filter(torch.rand(1, 4), k=-1)


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.floats(0, 10, allow_nan=False), min_size=1, max_size=32), k=st.floats(0, 3))
def test_iqr_filter_matches_its_definition(values, k):
    entropy = torch.tensor([values], dtype=torch.float64)
    result = iqr_filter(entropy, k=k)
    q1, q3 = torch.quantile(entropy[0], torch.tensor([0.25, 0.75], dtype=torch.float64))
    expected = entropy[0] >= q1 - k * (q3 - q1)
    assert result.keep[0].tolist() == expected.tolist()
    assert result.keep[0, entropy[0].argmax()]  # the most uncertain trajectory is never dropped
    perm = torch.randperm(len(values))
    assert iqr_filter(entropy[:, perm], k=k).keep[0].tolist() == result.keep[0, perm].tolist()
