import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from megatron_mgrpo.algo import group_advantages

ESTIMATORS = ["grpo", "drgrpo", "rloo"]
groups = st.lists(st.lists(st.tuples(st.sampled_from([0.0, 1.0]), st.booleans()), min_size=1, max_size=12),
                  min_size=1, max_size=5)


def as_tensors(rows):
    """Rows of (reward, kept) pairs of different lengths -> padded rewards and keep (padding dropped)."""
    width = max(len(r) for r in rows)
    rewards = torch.tensor([[x for x, _ in r] + [0.0] * (width - len(r)) for r in rows])
    keep = torch.tensor([[k for _, k in r] + [False] * (width - len(r)) for r in rows])
    return rewards, keep


def test_grpo_by_hand():
    # rewards 1 1 0 0: mean 0.5, sample std sqrt((4 * 0.25) / 3) = sqrt(1/3)
    adv = group_advantages(torch.tensor([[1.0, 1.0, 0.0, 0.0]]), torch.ones(1, 4, dtype=torch.bool), eps=0.0)
    assert torch.allclose(adv, torch.tensor([[1.0, 1.0, -1.0, -1.0]]) * 0.5 / math.sqrt(1 / 3))


def test_rloo_and_drgrpo_by_hand():
    rewards, keep = torch.tensor([[1.0, 0.0, 0.0]]), torch.ones(1, 3, dtype=torch.bool)
    # leave-one-out: 1 - mean(0, 0) = 1; 0 - mean(1, 0) = -0.5
    assert torch.allclose(group_advantages(rewards, keep, "rloo"), torch.tensor([[1.0, -0.5, -0.5]]))
    assert torch.allclose(group_advantages(rewards, keep, "drgrpo"), torch.tensor([[2 / 3, -1 / 3, -1 / 3]]))


def test_dropped_responses_do_not_count():
    rewards = torch.tensor([[1.0, 0.0, 1.0, 1.0]])
    keep = torch.tensor([[True, True, False, False]])
    assert torch.allclose(group_advantages(rewards, keep, "drgrpo"), torch.tensor([[0.5, -0.5, 0.0, 0.0]]))
    # grpo over the kept pair: mean 0.5, sample std sqrt(0.5)
    expected = torch.tensor([[1.0, -1.0, 0.0, 0.0]]) / math.sqrt(2)
    assert torch.allclose(group_advantages(rewards, keep, eps=0.0), expected)


@pytest.mark.parametrize("rewards, keep", [
    ([[1.0, 1.0, 1.0]], [[True, True, True]]),    # unanimous: no signal
    ([[0.1, 0.1, 0.1]], [[True, True, True]]),    # equal, and the mean does not round back to 0.1
    ([[1.0, 0.0, 1.0]], [[True, False, False]]),  # one kept response: no group
    ([[1.0, 0.0]], [[False, False]]),             # everything dropped
])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_degenerate_groups_get_exactly_zero(rewards, keep, estimator):
    assert (group_advantages(torch.tensor(rewards, dtype=torch.float64), torch.tensor(keep), estimator) == 0).all()


@settings(max_examples=60, deadline=None)
@given(rows=groups, estimator=st.sampled_from(ESTIMATORS))
def test_kept_advantages_sum_to_zero_and_are_permutation_equivariant(rows, estimator):
    rewards, keep = as_tensors(rows)
    adv = group_advantages(rewards, keep, estimator)
    assert torch.allclose(adv.sum(-1), torch.zeros(len(rows)), atol=1e-4)
    assert (adv[~keep] == 0).all()
    perm = torch.randperm(rewards.shape[1])
    assert torch.allclose(group_advantages(rewards[:, perm], keep[:, perm], estimator), adv[:, perm], atol=1e-6)
    # right answers are pushed up, wrong ones down, whatever the estimator
    assert (adv[(rewards == 1) & keep] >= 0).all() and (adv[(rewards == 0) & keep] <= 0).all()


@settings(max_examples=40, deadline=None)
@given(rows=groups)
def test_grpo_advantages_have_unit_sample_std(rows):
    rewards, keep = as_tensors(rows)
    adv = group_advantages(rewards.double(), keep, eps=0.0)
    for row_adv, row_keep in zip(adv, keep):
        kept = row_adv[row_keep]
        if kept.abs().sum() > 0:
            assert kept.std().item() == pytest.approx(1.0)


def test_integer_rewards_are_accepted():
    adv = group_advantages(torch.tensor([[1, 0]]), torch.ones(1, 2, dtype=torch.bool), "drgrpo")
    assert adv.dtype == torch.float32 and adv.tolist() == [[0.5, -0.5]]


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="algo.advantage_estimator='ppo'"):
        group_advantages(torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), "ppo")
    with pytest.raises(ValueError, match=r"\(1, 2\) and keep \(1, 3\)"):
        group_advantages(torch.zeros(1, 2), torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="keep must be a bool mask"):
        group_advantages(torch.zeros(1, 2), torch.ones(1, 2))
