import random

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from megatron_mgrpo.reward import vote


def test_vote_by_hand(grader):
    result = vote(["4", "4.0", "5", None, "5", r"\frac{8}{2}"], grader)
    assert result.label == "4" and result.share == pytest.approx(3 / 5)
    assert result.class_sizes == [3, 2] and result.n_voters == 5 and result.n_unparseable == 1
    assert result.classes == [0, 0, 1, None, 1, 0]


def test_label_is_the_smallest_canonical_form_of_the_winning_class(grader):
    result = vote([r"\frac{1}{2}", "0.50", r"\dfrac12", "7"], grader)
    assert result.label == "0.5" and result.class_sizes == [3, 1]


def test_tie_goes_to_the_smallest_representative(grader):
    assert vote(["9", "10", "10", "9"], grader).label == "10"  # "10" < "9" as strings
    assert vote(["10", "9", "9", "10"], grader).label == "10"
    assert vote(["9", r"\frac{18}{2}", "10", "10.0"], grader).label == "10"


def test_threshold_and_empty_votes(grader):
    low = vote(["1", "2", "3", "1"], grader, threshold=0.6)
    assert low.label is None and low.share == 0.5 and low.winner is not None
    assert vote(["1", "2", "3", "1"], grader, threshold=0.5).label == "1"  # the threshold is inclusive
    nobody = vote([None, None], grader)
    assert nobody.label is None and nobody.share == 0.0 and nobody.n_unparseable == 2 and nobody.class_sizes == []
    with pytest.raises(ValueError, match="reward.vote_threshold=2 must be in"):
        vote(["1"], grader, threshold=2)
    with pytest.raises(ValueError, match="vote got 1 class ids for 2 answers"):
        vote(["1", "2"], grader, classes=[0])


def test_unparseable_answers_never_win(grader):
    result = vote([None, None, None, "3"], grader)
    assert result.label == "3" and result.share == 1.0 and result.n_voters == 1


answer_st = st.one_of(st.none(), st.sampled_from(["1", "1.0", r"\frac{2}{2}", "2", "3", "x", r"\frac12", "0.5"]))


@settings(max_examples=40, deadline=None)
@given(answers=st.lists(answer_st, max_size=12), seed=st.integers(0, 1000), threshold=st.floats(0, 1))
def test_vote_is_permutation_invariant(grader, answers, seed, threshold):
    result = vote(answers, grader, threshold)
    shuffled = answers[:]
    random.Random(seed).shuffle(shuffled)
    again = vote(shuffled, grader, threshold)
    assert (result.label, result.share, result.class_sizes) == (again.label, again.share, again.class_sizes)
    assert 0.0 <= result.share <= 1.0
    assert result.n_voters == sum(a is not None for a in answers) == sum(result.class_sizes)
    assert all(c is None for a, c in zip(answers, result.classes) if a is None)
    assert (result.label is None) == (result.n_voters == 0 or result.share < threshold)
    # adding unparseable answers changes nothing but the count of non-voters
    padded = vote(answers + [None, None], grader, threshold)
    assert (padded.label, padded.share, padded.n_unparseable) == (result.label, result.share, result.n_unparseable + 2)
