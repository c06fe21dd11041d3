import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from megatron_mgrpo.algo import aggregate, policy_loss


def batch(seed=0, b=4, t=6):
    """Log-probs, a ragged mask (row 3 has no tokens left after 2, row 1 after 4), advantages."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, 4:] = False
    mask[3, 2:] = False
    return logp, mask, torch.randn(b, generator=g, dtype=torch.float64)


def on_policy_gradient(mask, adv, agg):
    """d loss / d logp at ratio 1: -A per token over the aggregation's normaliser."""
    m = mask.double()
    if agg == "token-mean":
        return -adv[:, None] * m / m.sum()
    sequences = (m.sum(-1) > 0).sum()
    if agg == "seq-mean-token-sum":
        return -adv[:, None] * m / sequences
    return -adv[:, None] * m / m.sum(-1, keepdim=True).clamp(min=1) / sequences


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
def test_on_policy_gradient_is_reinforce(agg):
    logp, mask, adv = batch()
    logp.requires_grad_(True)
    loss, stats = policy_loss(logp, logp.detach(), adv, mask, agg=agg)
    loss.backward()
    assert torch.allclose(logp.grad, on_policy_gradient(mask, adv, agg))
    assert stats["clip_fraction"] == 0 and stats["ratio_mean"] == 1


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), shift=st.floats(-0.3, 0.3))
def test_tis_with_rollout_equal_to_old_changes_nothing(seed, shift):
    logp, mask, adv = batch(seed)
    old = logp + shift
    logp.requires_grad_(True)
    plain, _ = policy_loss(logp, old, adv, mask)
    (plain_grad,) = torch.autograd.grad(plain, logp)
    corrected, stats = policy_loss(logp, old, adv, mask, rollout_logp=old.clone())
    (corrected_grad,) = torch.autograd.grad(corrected, logp)
    assert torch.equal(plain, corrected) and torch.equal(plain_grad, corrected_grad)
    assert stats["tis_weight_mean"] == 1 and stats["tis_capped_fraction"] == 0


def test_tis_truncates_and_masks_by_hand():
    logp = torch.zeros(1, 3, requires_grad=True)
    old = torch.zeros(1, 3)
    rollout = torch.log(torch.tensor([[1.0, 0.25, 0.1]]))  # w = 1, 4, 10
    mask, adv = torch.ones(1, 3), torch.ones(1)
    loss, stats = policy_loss(logp, old, adv, mask, rollout_logp=rollout, tis_cap=2.0)
    loss.backward()
    assert torch.allclose(logp.grad, -torch.tensor([[1.0, 2.0, 2.0]]) / 3)
    assert torch.isclose(stats["tis_capped_fraction"], torch.tensor(2 / 3))
    assert torch.isclose(stats["tis_weight_mean"], torch.tensor(5 / 3))
    logp.grad = None
    loss, stats = policy_loss(logp, old, adv, mask, rollout_logp=rollout, tis_cap=2.0, tis_mode="mask")
    loss.backward()
    assert torch.allclose(logp.grad, -torch.tensor([[1.0, 0.0, 0.0]]) / 3)
    assert torch.isclose(stats["tis_weight_mean"], torch.tensor(1 / 3))


@pytest.mark.parametrize("advantage, log_ratio, clipped", [
    (1.0, 0.5, True),     # ratio 1.65 > 1 + 0.28 with A > 0: no further push up
    (-1.0, -0.5, True),   # ratio 0.61 < 1 - 0.2 with A < 0: no further push down
    (1.0, 0.2, False),    # inside the trust region
    (1.0, -0.5, False),   # outside, but on the side where the gradient pulls back: full gradient
    (-1.0, 0.5, False),
])
def test_clip_zeroes_the_gradient_outside_the_trust_region(advantage, log_ratio, clipped):
    logp = torch.tensor([[log_ratio]], requires_grad=True)
    loss, stats = policy_loss(logp, torch.zeros(1, 1), torch.tensor([advantage]), torch.ones(1, 1))
    loss.backward()
    if clipped:
        assert logp.grad.item() == 0 and stats["clip_fraction"] == 1
    else:  # d/dlogp of -A exp(logp - old)
        assert logp.grad.item() == pytest.approx(-advantage * torch.exp(torch.tensor(log_ratio)).item())
        assert stats["clip_fraction"] == 0


def test_padding_reaches_neither_loss_nor_gradient():
    logp, mask, adv = batch(3)
    garbage = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=torch.float64)
    noisy = [x.clone() for x in (logp, logp - 0.1, logp + 0.1)]
    for x in noisy:
        x[~mask] = garbage[torch.arange(int((~mask).sum())) % 3]
    clean = [x.clone().masked_fill(~mask, 0) for x in (logp, logp - 0.1, logp + 0.1)]
    results = []
    for current, old, rollout in (noisy, clean):
        current.requires_grad_(True)
        loss, stats = policy_loss(current, old, adv, mask, rollout_logp=rollout)
        loss.backward()
        results.append((loss, current.grad, stats))
    (loss_a, grad_a, stats_a), (loss_b, grad_b, stats_b) = results
    assert torch.isfinite(loss_a) and torch.equal(loss_a, loss_b) and torch.equal(grad_a, grad_b)
    assert all(torch.equal(stats_a[k], stats_b[k]) for k in stats_b)


def test_aggregation_modes_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert aggregate(values, mask, "token-mean") == pytest.approx(10 / 4)
    assert aggregate(values, mask, "seq-mean-token-sum") == pytest.approx((6 + 4) / 2)
    assert aggregate(values, mask, "seq-mean-token-mean") == pytest.approx((2 + 4) / 2)
    empty_row = torch.tensor([[1, 1, 1], [0, 0, 0]])
    assert aggregate(values, empty_row, "seq-mean-token-mean") == pytest.approx(2.0)
    assert aggregate(values, torch.zeros(2, 3), "token-mean") == 0


def test_bad_settings_name_the_key():
    logp, mask, adv = batch()
    for kwargs, message in (({"agg": "sum"}, "algo.loss_agg='sum'"), ({"tis_mode": "x"}, "algo.tis_mode='x'"),
                            ({"clip_low": -0.1}, "algo.clip_low=-0.1"), ({"clip_low": 1.0}, "algo.clip_low=1.0"),
                            ({"clip_high": -1}, "algo.clip_high=-1"), ({"tis_cap": 0.0}, "algo.tis_cap=0.0")):
        with pytest.raises(ValueError, match=message):
            policy_loss(logp, logp, adv, mask, rollout_logp=logp, **kwargs)


def test_bad_shapes_are_named():
    logp, mask, adv = batch()
    with pytest.raises(ValueError, match=r"rollout_logp has shape \(4, 5\)"):
        policy_loss(logp, logp, adv, mask, rollout_logp=logp[:, :5])
    with pytest.raises(ValueError, match=r"advantages must be one per sequence, shape \(4,\), got \(4, 1\)"):
        policy_loss(logp, logp, adv[:, None], mask)
