import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from megatron_mgrpo.algo import entropy_from_logits, kl_penalty, self_certainty_from_logits


@settings(max_examples=60, deadline=None)
@given(logp=st.floats(-30, 0), ref=st.floats(-30, 0))
def test_kl_estimators_match_their_closed_forms(logp, ref):
    a, b = torch.tensor([logp], dtype=torch.float64), torch.tensor([ref], dtype=torch.float64)
    r = math.exp(ref - logp)
    assert kl_penalty(a, b, "k1").item() == pytest.approx(logp - ref, abs=1e-12)
    assert kl_penalty(a, b, "k2").item() == pytest.approx(0.5 * (logp - ref) ** 2, abs=1e-12)
    assert kl_penalty(a, b, "k3").item() == pytest.approx(r - math.log(r) - 1, rel=1e-9, abs=1e-12)
    assert kl_penalty(a, b, "k3").item() >= 0


def test_k3_is_unbiased_and_lower_variance_than_k1():
    torch.manual_seed(0)
    p, q = torch.softmax(torch.randn(6), 0), torch.softmax(torch.randn(6), 0)
    draws = torch.multinomial(p, 200_000, replacement=True)
    k1, k3 = (kl_penalty(p.log()[draws], q.log()[draws], e) for e in ("k1", "k3"))
    exact = (p * (p / q).log()).sum().item()
    assert k3.mean().item() == pytest.approx(exact, rel=0.02) and k1.mean().item() == pytest.approx(exact, rel=0.02)
    assert k3.var() < k1.var()


def test_unknown_kl_estimator_names_the_key():
    with pytest.raises(ValueError, match="algo.kl_estimator='k4'"):
        kl_penalty(torch.zeros(1), torch.zeros(1), "k4")


def test_entropy_against_a_direct_computation():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 11, dtype=torch.float64) * 4
    probs = torch.softmax(logits, -1)
    assert torch.allclose(entropy_from_logits(logits).double(), -(probs * probs.log()).sum(-1), atol=1e-5)
    assert entropy_from_logits(torch.zeros(5, 7)).allclose(torch.full((5,), math.log(7)))


def test_entropy_is_stable_for_extreme_and_masked_logits():
    logits = torch.tensor([[1e4, 0.0, -1e4], [3.0, 1.0, -float("inf")]], requires_grad=True)
    entropy = entropy_from_logits(logits)
    entropy.sum().backward()
    assert entropy[0].item() == 0.0
    p = torch.softmax(torch.tensor([3.0, 1.0]), 0)  # a -inf logit is a vocabulary entry that does not exist
    assert entropy[1].item() == pytest.approx(-(p * p.log()).sum().item(), rel=1e-6)
    assert torch.isfinite(logits.grad).all()
    assert entropy_from_logits(torch.randn(4, 9).bfloat16()).dtype == torch.float32


def test_self_certainty_against_the_direct_formula():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 11) * 4
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    probs = torch.softmax(logits.double(), -1)
    kl_from_uniform = (torch.full_like(probs, 1 / 11) * (torch.full_like(probs, 1 / 11) / probs).log()).sum(-1)
    expected = (kl_from_uniform * mask).sum(-1) / mask.sum(-1)
    assert torch.allclose(self_certainty_from_logits(logits, mask).double(), expected, atol=1e-5)


def test_self_certainty_of_uniform_and_empty_sequences_is_zero():
    assert torch.allclose(self_certainty_from_logits(torch.zeros(1, 2, 7), torch.ones(1, 2)), torch.zeros(1), atol=1e-6)
    assert self_certainty_from_logits(torch.randn(1, 2, 7), torch.zeros(1, 2)).item() == 0
    # shifting every logit changes nothing, however large the shift
    logits = torch.randn(1, 4, 9)
    assert torch.allclose(self_certainty_from_logits(logits + 1e3, torch.ones(1, 4)),
                          self_certainty_from_logits(logits, torch.ones(1, 4)), atol=1e-3)
