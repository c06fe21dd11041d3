import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from megatron_mgrpo.algo import (aggregate, entropy_from_logits, kl_penalty, policy_loss,
                                 self_certainty_from_logits)


def batch(seed=0, b=4, t=6):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(b, t, generator=g) * 3
    mask = torch.ones(b, t)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    return logp, mask, torch.randn(b, generator=g)


def test_on_policy_gradient_is_reinforce():
    logp, mask, adv = batch()
    logp.requires_grad_(True)
    loss, stats = policy_loss(logp, logp.detach(), adv, mask)
    loss.backward()
    # d/dlogp of -A * exp(logp - logp_old) at ratio 1 is -A per token, averaged over all tokens
    expected = -adv[:, None] * mask / mask.sum()
    assert torch.allclose(logp.grad, expected) and stats["clip_fraction"] == 0 and stats["ratio_mean"] == 1


def test_tis_with_matching_logprobs_changes_nothing():
    logp, mask, adv = batch(1)
    old = logp - 0.05
    plain, _ = policy_loss(logp, old, adv, mask)
    corrected, stats = policy_loss(logp, old, adv, mask, rollout_logp=old.clone())
    assert torch.allclose(plain, corrected) and stats["tis_weight_mean"] == 1 and stats["tis_capped_fraction"] == 0


def test_tis_truncates_and_masks():
    logp = torch.zeros(1, 3, requires_grad=True)
    old = torch.zeros(1, 3)
    rollout = torch.log(torch.tensor([[1.0, 0.25, 0.1]]))  # weights 1, 4, 10
    mask, adv = torch.ones(1, 3), torch.ones(1)
    loss, stats = policy_loss(logp, old, adv, mask, rollout_logp=rollout, tis_cap=2.0)
    loss.backward()
    assert torch.allclose(logp.grad, -torch.tensor([[1.0, 2.0, 2.0]]) / 3)
    assert torch.isclose(stats["tis_capped_fraction"], torch.tensor(2 / 3))
    logp.grad = None
    loss, _ = policy_loss(logp, old, adv, mask, rollout_logp=rollout, tis_cap=2.0, tis_mode="mask")
    loss.backward()
    assert torch.allclose(logp.grad, -torch.tensor([[1.0, 0.0, 0.0]]) / 3)


@pytest.mark.parametrize("advantage, log_ratio, clipped", [
    (1.0, 0.5, True),     # ratio 1.65 > 1 + 0.28 with A > 0: no further push up
    (-1.0, -0.5, True),   # ratio 0.61 < 1 - 0.2 with A < 0: no further push down
    (1.0, -0.5, False),   # inside the trust region on the side that matters: full gradient
    (-1.0, 0.5, False),
])
def test_clip_gradient_outside_the_trust_region_is_zero(advantage, log_ratio, clipped):
    logp = torch.tensor([[log_ratio]], requires_grad=True)
    loss, stats = policy_loss(logp, torch.zeros(1, 1), torch.tensor([advantage]), torch.ones(1, 1))
    loss.backward()
    if clipped:
        assert logp.grad.item() == 0 and stats["clip_fraction"] == 1
    else:
        assert logp.grad.item() == pytest.approx(-advantage * torch.exp(torch.tensor(log_ratio)).item())


def test_aggregation_modes_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert aggregate(values, mask, "token-mean") == pytest.approx(10 / 4)
    assert aggregate(values, mask, "seq-mean-token-sum") == pytest.approx((6 + 4) / 2)
    assert aggregate(values, mask, "seq-mean-token-mean") == pytest.approx((2 + 4) / 2)
    empty_row = torch.tensor([[1, 1, 1], [0, 0, 0]])
    assert aggregate(values, empty_row, "seq-mean-token-mean") == pytest.approx(2.0)


def test_bad_loss_settings_name_the_key():
    logp, mask, adv = batch()
    for kwargs, key in (({"agg": "sum"}, "algo.loss_agg"), ({"tis_mode": "x"}, "algo.tis_mode"),
                        ({"clip_low": -0.1}, "algo.clip_low"), ({"tis_cap": 0.0}, "algo.tis_cap")):
        with pytest.raises(ValueError, match=key):
            policy_loss(logp, logp, adv, mask, rollout_logp=logp, **kwargs)
    with pytest.raises(ValueError, match="algo.kl_estimator"):
        kl_penalty(logp, logp, "k4")


@settings(max_examples=50, deadline=None)
@given(logp=st.floats(-8, 0), ref=st.floats(-8, 0))
def test_kl_estimators_closed_forms(logp, ref):
    a, b = torch.tensor([logp], dtype=torch.float64), torch.tensor([ref], dtype=torch.float64)
    r = torch.exp(b - a)
    assert torch.allclose(kl_penalty(a, b, "k1"), a - b)
    assert torch.allclose(kl_penalty(a, b, "k2"), 0.5 * (a - b) ** 2)
    assert torch.allclose(kl_penalty(a, b, "k3"), r - torch.log(r) - 1)
    assert kl_penalty(a, b, "k3").item() >= 0


def test_k3_is_an_unbiased_kl_estimate():
    torch.manual_seed(0)
    p, q = torch.softmax(torch.randn(6), 0), torch.softmax(torch.randn(6), 0)
    draws = torch.multinomial(p, 200_000, replacement=True)
    estimate = kl_penalty(p.log()[draws], q.log()[draws], "k3").mean()
    assert estimate == pytest.approx((p * (p / q).log()).sum().item(), rel=0.02)


def test_entropy_and_self_certainty_against_direct_formulas():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 11) * 4
    logits[0, 0, 5] = 1e4  # a saturated distribution must not produce NaN
    probs = torch.softmax(logits, -1)
    direct = -(probs * probs.clamp(min=1e-30).log()).sum(-1)
    assert torch.allclose(entropy_from_logits(logits), direct, atol=1e-5)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    per_token = (-torch.log(torch.tensor(11.0)) - torch.log_softmax(logits, -1).mean(-1))
    expected = (per_token * mask).sum(-1) / mask.sum(-1)
    assert torch.allclose(self_certainty_from_logits(logits, mask), expected, atol=1e-4)
    uniform = self_certainty_from_logits(torch.zeros(1, 2, 7), torch.ones(1, 2))
    assert torch.allclose(uniform, torch.zeros(1), atol=1e-6)
