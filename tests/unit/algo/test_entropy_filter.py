import math

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings

from megatron_mgrpo.algo import iqr_keep_mask, iqr_threshold

NAN = float("nan")


def test_paper_rule_by_hand():
    # one prompt, G = 8, already sorted. Q1 sits at position 0.25 * 7 = 1.75:
    # 1.3 + 0.75 * (1.8 - 1.3) = 1.675; Q3 at 5.25: 2.0 + 0.25 * (2.4 - 2.0) = 2.1;
    # T = 1.675 - 0.75 * (2.1 - 1.675) = 1.35625 -> 0.1 and 1.3 are dropped.
    entropy = torch.tensor([[0.1, 1.3, 1.8, 2.0, 2.0, 2.0, 2.4, 3.0]])
    assert iqr_threshold(entropy).item() == pytest.approx(1.35625)
    keep = iqr_keep_mask(entropy)
    assert keep.tolist() == [[False, False, True, True, True, True, True, True]]


def test_nothing_is_dropped_from_equal_or_tiny_groups():
    assert iqr_keep_mask(torch.full((2, 5), 0.7)).all()
    assert iqr_keep_mask(torch.full((1, 6), 0.1, dtype=torch.bfloat16)).all()
    for g in (1, 2):
        assert iqr_keep_mask(torch.rand(3, g)).all()


def test_nan_entropies_are_left_out_and_dropped():
    entropy = torch.tensor([[1.0, NAN, 1.1, 0.9, 0.2], [NAN] * 5])
    # row 0 quartiles over [0.2, 0.9, 1.0, 1.1]: Q1 = 0.725, Q3 = 1.025, T = 0.5
    assert iqr_threshold(entropy)[0].item() == pytest.approx(0.5) and math.isnan(iqr_threshold(entropy)[1])
    keep = iqr_keep_mask(entropy)
    assert keep.tolist() == [[True, False, True, True, False], [False] * 5]


@settings(max_examples=80, deadline=None)
@given(values=st.lists(st.floats(0, 10, allow_nan=False), min_size=1, max_size=32),
       nans=st.integers(0, 3), k=st.floats(0, 3))
def test_matches_numpy_quartiles_and_keeps_the_most_uncertain(values, nans, k):
    row = np.array(values + [np.nan] * nans)
    q1, q3 = np.quantile(np.array(values), [0.25, 0.75])  # numpy's default: linear interpolation
    expected = row >= q1 - k * (q3 - q1)  # NaN >= T is False
    keep = iqr_keep_mask(torch.from_numpy(row)[None], k=k)[0]
    assert keep.tolist() == expected.tolist()
    assert keep[int(np.argmax(values))]
    perm = torch.randperm(len(row))
    assert iqr_keep_mask(torch.from_numpy(row)[None, perm], k=k)[0].tolist() == keep[perm].tolist()


@settings(max_examples=30, deadline=None)
@given(value=st.floats(0, 20, allow_nan=False, width=32), g=st.integers(1, 40))
def test_equal_float32_entropies_are_all_kept(value, g):
    assert iqr_keep_mask(torch.full((1, g), value, dtype=torch.float32)).all()


def test_rows_are_independent():
    a, b = torch.rand(1, 8), torch.rand(1, 8) + 5
    both = iqr_keep_mask(torch.cat([a, b]))
    assert torch.equal(both, torch.cat([iqr_keep_mask(a), iqr_keep_mask(b)]))


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="algo.iqr_k=-1"):
        iqr_keep_mask(torch.rand(1, 4), k=-1)
    with pytest.raises(ValueError, match=r"\[prompts, group\] tensor, got torch.float32 \(4,\)"):
        iqr_keep_mask(torch.rand(4))
