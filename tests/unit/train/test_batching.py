"""Sequences, data-parallel shares and micro-batches under a token budget."""

import pytest
from hypothesis import given, strategies as st

from megatron_mgrpo.train.batching import (TrainSequences, collate, data_parallel_share, micro_batches,
                                           pack_by_tokens)


def test_fields_align_with_the_targets():
    seqs = TrainSequences([[5, 6, 7, 8], [5, 9]], [2, 1], {"logp": [[-1.0, -2.0], [-3.0]]}, {"adv": [0.5, -1.0]})
    batch = collate(seqs, [0, 1], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8], [5, 9, 0, 0]]
    assert batch.targets.tolist() == [[6, 7, 8], [9, 0, 0]]
    # response tokens 7, 8 of sequence 0 are targets 1, 2; token 9 of sequence 1 is target 0
    assert batch.response_mask.tolist() == [[False, True, True], [True, False, False]]
    assert batch.fields["logp"].tolist() == [[0.0, -1.0, -2.0], [-3.0, 0.0, 0.0]]
    assert batch.fields["adv"].tolist() == [0.5, -1.0]


@given(st.lists(st.integers(1, 50), min_size=1, max_size=40), st.integers(1, 200))
def test_packing_covers_every_sequence_once_within_the_budget(lengths, budget):
    groups = pack_by_tokens(lengths, budget)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        assert len(group) == 1 or len(group) * max(lengths[i] for i in group) <= budget


def test_micro_batches_respect_the_budget_and_keep_indices():
    seqs = TrainSequences([[1] * n for n in (3, 9, 4, 8, 2)], [1] * 5)
    batches = micro_batches(seqs, token_budget=18)
    assert sorted(i for b in batches for i in b.indices) == [0, 1, 2, 3, 4]
    assert all(b.num_tokens <= 18 for b in batches)


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
