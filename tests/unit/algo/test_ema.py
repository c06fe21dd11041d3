import pytest
import torch

from megatron_mgrpo.algo import ema, ema_update_


def tensors(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g).to(dtype) for shape in ((5, 3), (7,), (2, 2, 2), (1,))]


@pytest.fixture(params=["compiled", "eager"])
def mode(request, monkeypatch):
    monkeypatch.setattr(ema, "_compile_failed", request.param == "eager")
    return request.param


@pytest.mark.slow
@pytest.mark.parametrize("src_dtype", [torch.float32, torch.bfloat16])
def test_update_matches_the_formula(mode, src_dtype):
    target, src = tensors(0), tensors(1, src_dtype)
    expected = [0.9 * t + 0.1 * s.float() for t, s in zip(target, src)]
    ema_update_(target, src, 0.9)
    for got, want in zip(target, expected):
        assert torch.allclose(got, want, atol=1e-6)
    assert ema._compile_failed == (mode == "eager")


@pytest.mark.slow
@pytest.mark.parametrize("src_dtype", [torch.float32, torch.bfloat16])
def test_momentum_zero_copies_and_one_keeps(mode, src_dtype):
    target, src = tensors(0), tensors(1, src_dtype)
    before = [t.clone() for t in target]
    ema_update_(target, src, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(target, before))
    ema_update_(target, src, 0.0)
    assert all(torch.equal(a, b.float()) for a, b in zip(target, src))


def test_repeated_updates_converge_to_the_source():
    target, src = tensors(0), tensors(1)
    for _ in range(200):
        ema_update_(target, src, 0.9)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(target, src))


def test_bad_inputs():
    with pytest.raises(ValueError, match="algo.momentum=1.5"):
        ema_update_(tensors(0), tensors(1), 1.5)
    with pytest.raises(ValueError, match="mirror the local parameter shards"):
        ema_update_(tensors(0), tensors(1)[:2], 0.9)
    with pytest.raises(ValueError, match="must be kept in fp32"):
        ema_update_(tensors(0, torch.bfloat16), tensors(1), 0.9)
    with pytest.raises(ValueError, match="shape"):
        ema_update_([torch.zeros(3)], [torch.zeros(4)], 0.9)
