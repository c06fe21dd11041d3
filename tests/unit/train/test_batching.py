"""Sequences, data-parallel shares, rows with shared prompts and micro-batches under a token budget."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from megatron_mgrpo.train.batching import (
    MicroBatch,
    TrainSequences,
    collate,
    data_parallel_share,
    micro_batches,
    pack_by_tokens,
    row_width,
    share_prompt_rows,
)


def test_one_sequence_per_row_aligns_fields_with_the_targets():
    seqs = TrainSequences([[5, 6, 7, 8], [5, 9]], [2, 1], {"logp": [[-1.0, -2.0], [-3.0]]}, {"adv": [0.5, -1.0]})
    batch = collate(seqs, [[0], [1]], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8], [5, 9, 0, 0]]
    assert batch.attention_mask is None  # plain causal rows
    # response-major: row i holds the response tokens of sequence i, and where their logits are
    assert batch.targets.tolist() == [[7, 8], [9, 0]]
    assert batch.source.tolist() == [[1, 2], [4, 0]]  # row * width + position of the predicting token
    assert batch.response_mask.tolist() == [[True, True], [True, False]]
    assert batch.fields["logp"].tolist() == [[-1.0, -2.0], [-3.0, 0.0]]
    assert batch.fields["adv"].tolist() == [0.5, -1.0]


def test_a_shared_row_gives_each_response_the_prompt_and_itself():
    # prompt [5, 6]; responses [7, 8, 9] and [3]; a third sequence with another prompt
    seqs = TrainSequences([[5, 6, 7, 8, 9], [5, 6, 3], [4, 2]], [2, 2, 1],
                          {"logp": [[-1.0, -2.0, -3.0], [-4.0], [-5.0]]})
    batch = collate(seqs, [[0, 1], [2]], pad_id=0)
    assert batch.indices == [0, 1, 2]
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9, 3], [4, 2, 0, 0, 0, 0]]
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4, 2]  # the second response restarts after the prompt
    assert batch.targets.tolist() == [[7, 8, 9], [3, 0, 0], [2, 0, 0]]
    # 7 and 3 are both predicted at the prompt's last token (position 1); 8, 9 at 7, 8 (2, 3)
    assert batch.source.tolist() == [[1, 2, 3], [1, 0, 0], [6, 0, 0]]
    assert batch.fields["logp"].tolist() == [[-1.0, -2.0, -3.0], [-4.0, 0.0, 0.0], [-5.0, 0.0, 0.0]]
    attends = ~batch.attention_mask[0, 0]  # [query, key] of row 0
    assert attends[5].tolist() == [True, True, False, False, False, True]  # 3 sees the prompt and itself
    assert attends[4].tolist() == [True, True, True, True, True, False]  # 9 sees the prompt and 7, 8
    assert (~batch.attention_mask[1, 0, :2]).tolist() == [[True] + [False] * 5, [True, True] + [False] * 4]  # causal


def test_rows_share_only_equal_prompts_and_cover_every_sequence_once():
    seqs = TrainSequences([[1, 2, 3], [1, 2, 4, 4], [1, 9, 3], [1, 2, 5]], [2, 2, 2, 2])
    rows = share_prompt_rows(seqs, token_budget=100, pair_cost=0.0)
    assert sorted(map(sorted, rows)) == [[0, 1, 3], [2]]
    assert row_width(seqs, rows[0]) == 2 + 1 + 2 + 1
    assert share_prompt_rows(seqs, token_budget=100, pair_cost=None) == [[0], [1], [2], [3]]
    # a row stays within the budget: prompt 2 + responses of 1 and 2 tokens, then a new row
    assert share_prompt_rows(seqs, token_budget=5, pair_cost=0.0)[:2] == [[0, 1], [3]]


def test_sharing_stops_where_attention_would_cost_more_than_the_prompt_copy():
    """Long responses to a short prompt: sharing saves 2 prompt tokens per response, but the row's
    attention grows with its square; with attention that expensive every response gets its own row."""
    seqs = TrainSequences([[1, 2] + [7] * 50 for _ in range(4)], [2] * 4)
    assert len(share_prompt_rows(seqs, token_budget=10_000, pair_cost=0.0)) == 1
    assert len(share_prompt_rows(seqs, token_budget=10_000, pair_cost=0.01)) == 4


def test_rows_share_a_prompt_only_where_its_routed_experts_agree():
    prompt_routing = [torch.tensor([[0, 1], [2, 3]]), torch.tensor([[0, 1], [2, 3]]), torch.tensor([[0, 1], [3, 2]])]
    routing = [[torch.cat([route, torch.tensor([[1, 2]])])] for route in prompt_routing]  # one layer, topk 2
    seqs = TrainSequences([[1, 2, 3]] * 3, [2] * 3, routing=routing)
    assert share_prompt_rows(seqs, token_budget=100, pair_cost=0.0) == [[0, 1], [2]]
    batch = collate(seqs, [[0, 1]])
    # megatron's token order is [position, row]: positions 0, 1 the prompt, 2 and 3 the two responses
    assert batch.routing[0].tolist() == [[0, 1], [2, 3], [1, 2], [1, 2]]


@given(st.lists(st.integers(1, 50), min_size=1, max_size=40), st.integers(1, 200))
def test_packing_covers_every_sequence_once_within_the_budget(lengths, budget):
    groups = pack_by_tokens(lengths, budget)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        assert len(group) == 1 or len(group) * max(lengths[i] for i in group) <= budget


@pytest.mark.parametrize("pair_cost", [None, 0.0, 0.05])
def test_micro_batches_respect_the_budget_and_keep_indices(pair_cost):
    seqs = TrainSequences([[1] * n for n in (3, 9, 4, 8, 2)], [1] * 5)
    batches = micro_batches(seqs, token_budget=18, pair_cost=pair_cost)
    assert sorted(i for b in batches for i in b.indices) == [0, 1, 2, 3, 4]
    assert all(b.num_tokens <= 18 for b in batches)
    # every response token is the token its source position is followed by in its own sequence
    for batch in batches:
        for row, index in enumerate(batch.indices):
            response = seqs.tokens[index][1:]
            assert batch.targets[row, :len(response)].tolist() == response


def test_data_parallel_shares_partition_the_batch():
    shares = [data_parallel_share(10, rank, 3) for rank in range(3)]
    assert sorted(sum(shares, [])) == list(range(10))


@pytest.mark.parametrize("bad, message", [
    (dict(tokens=[[1, 2]], prompt_lengths=[3]), "prompt length 3"),
    (dict(tokens=[[1, 2, 3]], prompt_lengths=[1], token_fields={"logp": [[0.0]]}), "1 values for 2 response"),
    (dict(tokens=[[1, 2]], prompt_lengths=[1], sequence_fields={"adv": [1.0, 2.0]}), "2 values for 1"),
])
def test_inconsistent_sequences_are_rejected(bad, message):
    with pytest.raises(ValueError, match=message):
        TrainSequences(**bad)


def test_prompt_sharing_follows_the_attention_in_use(monkeypatch):
    """Shared rows need an arbitrary attention mask: megatron's local attention applies one,
    Transformer Engine's causal attention would silently ignore it, so auto turns sharing off and
    always is refused with the fix."""
    from megatron_mgrpo.config import ConfigError
    from megatron_mgrpo.models import hf_config
    from megatron_mgrpo.models.hf_config import model_spec_from_hf
    from megatron_mgrpo.train.policy import prompt_sharing
    from tests.helpers import tiny

    spec = model_spec_from_hf(tiny("qwen3").config)
    assert prompt_sharing("never", spec) is None
    monkeypatch.setattr(hf_config, "transformer_engine_available", lambda: False)
    cost = prompt_sharing("auto", spec)
    assert cost == prompt_sharing("always", spec) and 0 < cost < 1
    monkeypatch.setattr(hf_config, "transformer_engine_available", lambda: True)
    assert prompt_sharing("auto", spec) is None
    with pytest.raises(ConfigError, match="train.prompt_sharing=always needs megatron's local attention"):
        prompt_sharing("always", spec)


def test_a_micro_batch_moves_every_tensor_to_the_model_device():
    """Micro-batches are collated on the CPU; a model on a GPU reads them on its own device."""
    batch = MicroBatch([0], torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long), None,
                       torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long),
                       torch.ones(1, 2, dtype=torch.bool), {"advantage": torch.zeros(1)}, [torch.zeros(3, 2)])
    assert batch.to("cpu") is batch  # nothing to move: no copy
    moved = batch.to("meta")
    tensors = [moved.input_ids, moved.position_ids, moved.source, moved.targets, moved.response_mask,
               moved.fields["advantage"], *moved.routing]
    assert all(t.device.type == "meta" for t in tensors) and moved.attention_mask is None
    assert moved.indices == [0]
