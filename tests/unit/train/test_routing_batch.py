"""Per-sample routed experts -> megatron's sequence-major batch layout for routing replay."""

import pytest
import torch

from megatron_mgrpo.train.routing_replay import batch_routing


def test_batch_routing_is_sequence_major_and_pads_with_distinct_experts():
    g = torch.Generator().manual_seed(0)
    lengths, seq_len, topk = (5, 3), 6, 2
    samples = [[torch.randint(0, 8, (n, topk), generator=g) for _ in range(2)] for n in lengths]  # 2 layers
    layers = batch_routing(samples, seq_len, topk)
    assert len(layers) == 2 and layers[0].shape == (seq_len * 2, topk)
    grid = layers[1].view(seq_len, 2, topk)  # megatron flattens [seq, batch]
    for b, n in enumerate(lengths):
        assert torch.equal(grid[:n, b], samples[b][1])
        assert (grid[n:, b] == torch.arange(topk)).all()


def test_batch_routing_accepts_lists_and_rejects_misfits():
    assert torch.equal(batch_routing([[[[1, 2]]]], 1, 2)[0], torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match=r"sample 0, layer 0: routed experts of shape \(3, 2\) do not fit"):
        batch_routing([[torch.zeros(3, 2)]], seq_len=2, topk=2)
    with pytest.raises(ValueError, match=r"samples report routing for \[1, 2\] layers; the model has 1"):
        batch_routing([[torch.zeros(1, 2)], [torch.zeros(1, 2)] * 2], seq_len=2, topk=2)


def test_padding_rows_and_a_batch_without_samples_route_to_the_first_experts():
    (layer,) = batch_routing([[torch.tensor([[3, 1]])]], seq_len=2, topk=2, rows=3)
    grid = layer.view(2, 3, 2)
    assert torch.equal(grid[0, 0], torch.tensor([3, 1])) and (grid[:, 1:] == torch.arange(2)).all()
    empty = batch_routing([], seq_len=4, topk=2, rows=2, layers=3)
    assert len(empty) == 3 and all(torch.equal(t, torch.arange(2).expand(8, 2)) for t in empty)
    with pytest.raises(ValueError, match="or `layers`"):
        batch_routing([], seq_len=4, topk=2)
