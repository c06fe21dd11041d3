import pytest
import torch

from megatron_mgrpo.algo import ema, ema_update_, momentum_at

SHAPES = ((5, 3), (7,), (2, 2, 2), (1,))  # one structure, so the compiled path compiles once per process


def tensors(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g).to(dtype) for shape in SHAPES]


@pytest.fixture(params=["compiled", "eager"])
def path(request, monkeypatch):
    """Run a test through the compiled bf16 update and through its eager fallback."""
    monkeypatch.setattr(ema, "_compile_failed", request.param == "eager")
    return request.param


def reference(target, src, momentum):
    return [(momentum * t.double() + (1 - momentum) * s.double()).float() for t, s in zip(target, src)]


@pytest.mark.slow
@pytest.mark.parametrize("src_dtype", [torch.float32, torch.bfloat16])
def test_update_matches_the_formula(path, src_dtype):
    target, src = tensors(0), tensors(1, src_dtype)
    expected = reference(target, src, 0.9)
    ema_update_(target, src, 0.9)
    assert all(torch.allclose(got, want, rtol=1e-6, atol=1e-7) for got, want in zip(target, expected))
    assert ema._compile_failed == (path == "eager")


@pytest.mark.slow
def test_bf16_source_matches_the_fp32_update_within_bf16_rounding(path):
    target, src = tensors(0), tensors(1)
    fp32_result = [t.clone() for t in target]
    ema_update_(fp32_result, src, 0.75)
    ema_update_(target, [s.bfloat16() for s in src], 0.75)
    for got, want, s in zip(target, fp32_result, src):
        # the only difference is the source's rounding to bf16 (relative 2^-8), scaled by 1 - m
        assert ((got - want).abs() <= 0.25 * s.abs() * 2 ** -8 + 1e-6).all()


@pytest.mark.slow
@pytest.mark.parametrize("src_dtype", [torch.float32, torch.bfloat16])
def test_momentum_zero_copies_and_one_keeps_exactly(path, src_dtype):
    target, src = tensors(0), tensors(1, src_dtype)
    before = [t.clone() for t in target]
    ema_update_(target, src, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(target, before))
    ema_update_(target, src, 0.0)
    assert all(torch.equal(a, b.float()) for a, b in zip(target, src))


@pytest.mark.slow
def test_mixed_source_dtypes_and_changing_momentum(path):
    target = tensors(0) + tensors(1)
    src = tensors(2) + tensors(3, torch.bfloat16)  # the bf16 part has the structure compiled above
    for momentum in (0.9, 0.5, 0.99):  # a new momentum reuses the compiled update
        expected = reference(target, src, momentum)
        ema_update_(target, src, momentum)
        assert all(torch.allclose(got, want, rtol=1e-6, atol=1e-7) for got, want in zip(target, expected))


def test_repeated_updates_follow_the_geometric_series():
    target, src = tensors(0), tensors(1)
    start = [t.clone() for t in target]
    for _ in range(50):
        ema_update_(target, src, 0.9)
    decay = 0.9 ** 50
    assert all(torch.allclose(t, decay * a + (1 - decay) * s, atol=1e-6) for t, a, s in zip(target, start, src))


@pytest.mark.slow
def test_a_failed_compile_falls_back_to_the_eager_update(monkeypatch, caplog):
    def no_compiler(*args):
        raise torch._dynamo.exc.TorchDynamoException("no working C++ compiler")

    monkeypatch.setattr(ema, "_compile_failed", False)
    monkeypatch.setattr(ema, "_compiled_lerp", no_compiler)
    target, src = tensors(0), tensors(1, torch.bfloat16)
    expected = reference(target, src, 0.9)
    ema_update_(target, src, 0.9)
    assert all(torch.allclose(got, want, rtol=1e-6, atol=1e-7) for got, want in zip(target, expected))
    assert ema._compile_failed and "no working C++ compiler" in caplog.text


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"algo.momentum=1.5 must be in \[0, 1\]"):
        ema_update_(tensors(0), tensors(1), 1.5)
    with pytest.raises(ValueError, match="the EMA has 4 tensors but the source has 2"):
        ema_update_(tensors(0), tensors(1)[:2], 0.9)
    with pytest.raises(ValueError, match="EMA tensor 0 is torch.bfloat16; keep the momentum copy in fp32"):
        ema_update_(tensors(0, torch.bfloat16), tensors(1), 0.9)
    with pytest.raises(ValueError, match="source tensor 0 is torch.float16; expected fp32 or bf16"):
        ema_update_(tensors(0), tensors(1, torch.float16), 0.9)
    with pytest.raises(ValueError, match=r"EMA tensor 0 is \(3,\) on cpu but its source is \(4,\) on cpu"):
        ema_update_([torch.zeros(3)], [torch.zeros(4)], 0.9)


def test_momentum_schedules():
    assert [momentum_at(step, 100, 0.99, 0.99999) for step in (1, 50, 100)] == [0.99] * 3
    cosine = [momentum_at(step, 101, 0.99, 0.99999, "cosine") for step in range(1, 102)]
    assert cosine[0] == pytest.approx(0.99) and cosine[-1] == pytest.approx(0.99999)
    assert cosine[50] == pytest.approx((0.99 + 0.99999) / 2)  # half way, half the change
    assert all(a <= b for a, b in zip(cosine, cosine[1:]))
    assert momentum_at(500, 101, 0.99, 0.99999, "cosine") == pytest.approx(0.99999)  # past the end: held
    assert momentum_at(1, 1, 0.99, 0.5, "cosine") == 0.99
    with pytest.raises(ValueError, match="algo.momentum_schedule='step'"):
        momentum_at(1, 10, 0.99, 0.999, "step")
