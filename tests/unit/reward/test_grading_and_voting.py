import random
import time

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from megatron_mgrpo.reward import AnswerGrader, canonical_form, vote


@pytest.fixture(scope="module")
def grader():
    with AnswerGrader(num_workers=1, timeout_s=20.0) as g:
        yield g


@pytest.mark.parametrize("a, b", [(r"\frac{1}{2}", "0.5"), (r"2\sqrt{2}", r"\sqrt{8}"), ("1,000", "1000"),
                                  (r"\{1,2\}", r"\{2,1\}"), (r"50\%", "0.5"), ("-3", "-3.0"),
                                  (r"\dfrac{3}{4}", r"\frac34"), (r"\text{5}", "5")])
def test_equivalent_pairs(grader, a, b):
    assert grader.equivalent(a, b)


@pytest.mark.parametrize("a, b", [("3", "4"), ("-3", "3"), (r"\frac{1}{2}", r"\frac{1}{3}"), ("x+1", "x-1"),
                                  (r"\{1,2\}", r"\{1,3\}"), ("1,001", "1001.5")])
def test_different_pairs(grader, a, b):
    assert not grader.equivalent(a, b)


def test_canonical_form_is_conservative():
    assert canonical_form(r" $\left( 1, 2 \right)$. ") == "(1,2)"
    assert canonical_form("12,345") == "12345"
    assert canonical_form("1,2") == "1,2"  # a pair, not a thousands separator
    assert canonical_form("12.50") == canonical_form("12.5") == "12.5" and canonical_form("-3.0") == "-3"
    assert canonical_form("0.125") != canonical_form("0.12")
    assert canonical_form(r"\dfrac{1}{2}") == canonical_form(r"\frac{1}{2}")


def test_grouping_uses_the_fast_path(grader):
    before = grader.stats.verify_calls
    answers = ["0.5", r"\frac{1}{2}", "0.5 ", "$0.5$", "2", "2", None, r"\dfrac{1}{2}"]
    assert grader.group_answers(answers) == [0, 0, 0, 0, 1, 1, None, 0]
    # 3 distinct canonical forms (0.5, \frac{1}{2}, 2): at most 1 + 2 comparisons with class leaders
    assert grader.stats.verify_calls - before <= 3


def test_vote_by_hand(grader):
    result = vote(["4", "4.0", "5", None, "5", r"\frac{8}{2}"], grader)
    assert result.label == "4" and result.share == pytest.approx(3 / 5)
    assert result.class_sizes == [3, 2] and result.n_voters == 5 and result.n_unparseable == 1


def test_tie_goes_to_the_smallest_representative(grader):
    assert vote(["9", "10", "10", "9"], grader).label == "10"  # "10" < "9" as strings
    assert vote(["10", "9", "9", "10"], grader).label == "10"


def test_threshold_and_empty_votes(grader):
    low = vote(["1", "2", "3", "1"], grader, threshold=0.6)
    assert low.label is None and low.share == 0.5 and low.winner is not None
    nobody = vote([None, None], grader)
    assert nobody.label is None and nobody.share == 0.0 and nobody.n_unparseable == 2
    with pytest.raises(ValueError, match="reward.vote_threshold"):
        vote(["1"], grader, threshold=2)


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


@pytest.mark.slow
def test_a_hostile_answer_times_out_and_the_pool_recovers():
    with AnswerGrader(num_workers=1, timeout_s=2.0) as grader:
        start = time.perf_counter()
        classes = grader.group_answers(["9^{9^{9^{9^{9}}}}", "3", r"\frac{6}{2}", "3"])
        assert time.perf_counter() - start < 10
        assert grader.stats.timeouts == 1
        assert classes == [0, 1, 2, 1]  # only canonical merges survive a timeout
        assert grader.group_answers([r"\frac{1}{2}", "0.5"]) == [0, 0]  # fresh worker works


def test_close_stops_workers():
    grader = AnswerGrader(num_workers=2)
    processes = [w.process for w in grader._workers]
    assert grader.group_many([["1", "1.0"], ["2", "3"]]) == [[0, 0], [0, 1]]
    grader.close()
    assert not any(p.is_alive() for p in processes)


def test_in_process_mode_and_bad_settings():
    with AnswerGrader(num_workers=0) as grader:
        assert grader.equivalent("0.25", r"\frac{1}{4}")
    with pytest.raises(ValueError, match="reward.verify_workers"):
        AnswerGrader(num_workers=-1)
    with pytest.raises(ValueError, match="reward.verify_timeout_s"):
        AnswerGrader(timeout_s=0)
