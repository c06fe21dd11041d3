"""Shadow weights: EMA equals the formula, swapping in and out restores the module bit for bit."""

import pytest
import torch

from megatron_mgrpo.train.momentum import ShadowWeights


def model(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).to(dtype)


@pytest.mark.parametrize("offload", [False, True])
def test_ema_follows_the_formula(offload):
    net = model()
    shadow = ShadowWeights(net, offload=offload)
    start = [t.clone() for t in shadow.tensors]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    shadow.ema_update_(0.9)
    for s, s0, p in zip(shadow.tensors, start, net.parameters()):
        assert torch.allclose(s, 0.9 * s0 + 0.1 * p.detach(), atol=1e-7)
    assert shadow.nbytes == sum(p.numel() * 4 for p in net.parameters())
    assert list(shadow.state_dict()) == [name for name, _ in net.named_parameters()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swapped_in_computes_with_the_shadow_and_restores(dtype):
    net = model(dtype)
    shadow = ShadowWeights(net)
    for t in shadow.tensors:
        t.mul_(2)
    x = torch.randn(5, 4, dtype=dtype)
    before = net(x)
    originals = [p.detach().clone() for p in net.parameters()]
    reference = model(dtype)
    with torch.no_grad():
        for p in reference.parameters():
            p.mul_(2)
    with shadow.swapped_in():
        assert torch.equal(net(x), reference(x))
    assert torch.equal(net(x), before)
    assert all(torch.equal(p, o) for p, o in zip(net.parameters(), originals))
