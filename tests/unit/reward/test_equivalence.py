import itertools
import random
import time

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from megatron_mgrpo.reward import AnswerGrader, canonical_form
from tests.unit.reward.faulty_grouper import FaultyGrader

# Ways models write answers: equal values in several forms, and near misses.
CORPUS = ["0.5", r"\frac{1}{2}", r"\dfrac12", "1/2", "2", "2.0", r"\sqrt{4}", r"2\sqrt{2}", r"\sqrt{8}",
          r"\{1,2\}", r"\{2,1\}", r"\{1,3\}", "x+1", "1+x", "x-1", "-3", r"-\frac{6}{2}", "3", "1,000", "1000",
          r"\pi", "3.14", "k=2", "x=2", r"\frac{1}{3}", "0.333"]


def partition(classes: list[int | None]) -> set[frozenset[int]]:
    """Class ids up to renaming: the set of index groups."""
    groups: dict[int, set[int]] = {}
    for i, c in enumerate(classes):
        if c is not None:
            groups.setdefault(c, set()).add(i)
    return {frozenset(g) for g in groups.values()}


@pytest.mark.parametrize("a, b", [(r"\frac{1}{2}", "0.5"), (r"2\sqrt{2}", r"\sqrt{8}"), ("1,000", "1000"),
                                  (r"1{,}000", "1000"), (r"\{1,2\}", r"\{2,1\}"), (r"50\%", "0.5"), ("50%", r"50\%"),
                                  ("-3", "-3.0"), ("-3", r"-\frac{6}{2}"), (r"\dfrac{3}{4}", r"\frac34"),
                                  (r"\text{5}", "5"), ("x+1", "1+x"), (r"\frac{1}{3}", "0.3333333")])
def test_equivalent_pairs(grader, a, b):
    assert grader.equivalent(a, b)


@pytest.mark.parametrize("a, b", [("3", "4"), ("-3", "3"), (r"\frac{1}{2}", r"\frac{1}{3}"), ("x+1", "x-1"),
                                  (r"\{1,2\}", r"\{1,3\}"), ("1,001", "1001.5"), (r"\frac{1}{3}", "0.333"),
                                  ("50", r"50\%"), (r"A \leftarrow B", r"A \rightarrow B"), ("Tuesday", "sTuyade"),
                                  ("2**3", "2"), ("100000000000000000000", "100000000000000000001")])
def test_different_pairs(grader, a, b):
    assert not grader.equivalent(a, b)


def test_canonical_form_normalises_only_notation():
    assert canonical_form(r" $\left( 1, 2 \right)$. ") == "(1,2)"
    assert canonical_form("12,345") == canonical_form(r"12{,}345") == "12345"
    assert canonical_form("1,2") == "1,2"  # a pair, not a thousands separator
    assert canonical_form("12.50") == canonical_form("12.5") == "12.5" and canonical_form("-3.0") == "-3"
    assert canonical_form(".5") == "0.5" and canonical_form("-0.0") == "0" and canonical_form("\u22123") == "-3"
    assert canonical_form(r"\displaystyle \dfrac{1}{2}") == canonical_form(r"\frac{1}{2}")
    assert canonical_form(r"\text{\textbf{5}}") == "5" and canonical_form("50%") == canonical_form(r"50\%")


@pytest.mark.parametrize("a, b", [("0.125", "0.12"), (r"A \leftarrow B", r"A \rightarrow B"), (r"\pi r", r"\pir"),
                                  ("1, 2, ...", "1, 2,"), ("1.0000000000000000000000000000001", "1"),
                                  (r"5\$", "5\\"), ("no solution", "nosolution")])
def test_canonical_form_keeps_different_answers_apart(a, b):
    assert canonical_form(a) != canonical_form(b)


@given(st.text(alphabet="0123456789.,-$ {}\\%abcx", max_size=12))
def test_canonical_form_is_idempotent(text):
    assert canonical_form(canonical_form(text)) == canonical_form(text)


def test_equal_canonical_forms_are_equivalent_for_math_verify():
    """The free string merge never decides something math-verify would judge differently."""
    from math_verify import parse, verify

    written = ["1,000", "1000", "1000.0", r"1{,}000", "$1000$.", r"\dfrac{1}{2}", r"\frac{1}{2}", r"\tfrac{1}{2}",
               r"\left(1,2\right)", "(1, 2)", "0.50", ".5", "0.5", r"\text{7}", "7", "7.", r"\mathrm{7}"]
    for a, b in itertools.combinations(written, 2):
        if canonical_form(a) == canonical_form(b):
            assert verify(parse(f"${a}$"), parse(f"${b}$")), (a, b)


def test_grouping_uses_the_fast_path(grader):
    before = grader.stats.verify_calls
    answers = ["0.5", r"\frac{1}{2}", "0.5 ", "$0.5$", "2", "2", None, r"\dfrac{1}{2}", "  ", "x+1"]
    assert grader.group_answers(answers) == [0, 0, 0, 0, 1, 1, None, 0, None, 2]
    # 4 distinct canonical forms, 2 of them equal plain numbers, so they are compared by value:
    # only x+1 goes to math-verify, against the 2 class leaders found before it
    assert grader.stats.verify_calls - before == 2


def test_fast_grouping_matches_all_pairs_math_verify():
    """Same partition as checking every pair with math-verify and joining connected answers."""
    from math_verify import LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig()]
    parsed = [parse(f"${a}$", extraction_config=config) for a in CORPUS]
    parent = list(range(len(CORPUS)))

    def root(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for i, j in itertools.combinations(range(len(CORPUS)), 2):
        if verify(parsed[i], parsed[j]):
            parent[root(j)] = root(i)
    with AnswerGrader(num_workers=0) as in_process:
        assert partition(in_process.group_answers(CORPUS)) == partition([root(i) for i in range(len(CORPUS))])


@settings(max_examples=30, deadline=None)
@given(answers=st.lists(st.one_of(st.none(), st.sampled_from(CORPUS)), max_size=12), seed=st.integers(0, 1000))
def test_grouping_does_not_depend_on_answer_order(grader, answers, seed):
    order = list(range(len(answers)))
    random.Random(seed).shuffle(order)
    shuffled = grader.group_answers([answers[i] for i in order])
    unshuffled = [None] * len(answers)
    for position, i in enumerate(order):
        unshuffled[i] = shuffled[position]
    assert partition(grader.group_answers(answers)) == partition(unshuffled)


def test_integers_and_words_never_reach_math_verify():
    """Distinct integer forms are distinct numbers and a word equals only itself: such a prompt
    is grouped by canonical form alone, here without any grouper to call."""
    class NoSymbolicWork:
        def merge(self, forms):
            raise AssertionError(f"math-verify was asked about {forms}")

    grader = AnswerGrader(num_workers=0)
    grader._local = NoSymbolicWork()
    assert grader.group_many([["12", "12.0", "012", "-0", "0", "7", "seven days", None, "-7"]]) == [
        [0, 0, 0, 1, 1, 2, 3, None, 4]]
    with pytest.raises(AssertionError, match="math-verify was asked"):
        grader.group_answers(["12", r"\frac{24}{2}"])


def test_parse_cache_and_failure_counters(grader):
    grader.group_answers(["17", "19", r"\frac{", "23"])
    before = (grader.stats.parses, grader.stats.cache_hits, grader.stats.parse_failures)
    assert grader.group_answers(["17", "19", r"\frac{", "23"]) == [0, 1, 2, 3]
    after = (grader.stats.parses, grader.stats.cache_hits, grader.stats.parse_failures)
    assert after == (before[0], before[1] + 4, before[2])  # parsed once per worker lifetime


@pytest.mark.slow
def test_a_hang_becomes_a_counted_timeout_and_the_pool_recovers():
    with FaultyGrader(num_workers=2, timeout_s=1.0) as grader:
        grader.group_many([["1", "0.5"], ["3", "0.75"]])  # both workers up: start-up never counts against a deadline
        start = time.perf_counter()
        stuck, fine = grader.group_many([["hang", "3", r"\frac{6}{2}", "3"], [r"\frac{1}{2}", "0.5"]])
        assert time.perf_counter() - start < 5
        assert grader.stats.timeouts == 1
        assert stuck == [0, 1, 2, 1]  # only canonical merges survive a timeout
        assert fine == [0, 0]  # the other prompt was graded by the other worker meanwhile
        died, = grader.group_many([["die", "1", "1.0", r"\frac{2}{2}"]])
        assert grader.stats.worker_crashes == 1 and died == [0, 1, 1, 2]
        assert grader.group_many([[r"\frac{1}{2}", "0.5"]] * 3) == [[0, 0]] * 3  # replaced workers work
        processes = [worker.process for worker in grader._workers]
    assert not any(p.is_alive() for p in processes)  # leaving the context stops the workers


@pytest.mark.slow
def test_a_worker_killed_while_idle_is_replaced_and_counted():
    with AnswerGrader(num_workers=1) as grader:
        assert grader.group_answers([r"\frac{1}{2}", "0.5"]) == [0, 0]
        grader._workers[0].process.kill()  # e.g. the out-of-memory killer, between two steps
        grader._workers[0].process.join()
        assert grader.group_answers([r"\frac{1}{4}", "0.25", "3"]) == [0, 0, 1]
        assert grader.stats.worker_crashes == 1


@pytest.mark.slow
def test_a_real_hostile_answer_times_out():
    with AnswerGrader(num_workers=1, timeout_s=2.0) as grader:
        grader.group_answers(["1", "2"])
        start = time.perf_counter()
        assert grader.group_answers(["9^{9^{9^{9^{9}}}}", "3", r"\frac{6}{2}"]) == [0, 1, 2]
        assert time.perf_counter() - start < 10 and grader.stats.timeouts == 1


def test_in_process_mode_and_bad_settings():
    with AnswerGrader(num_workers=0) as grader:
        assert grader.equivalent("0.25", r"\frac{1}{4}") and grader.stats.requests == 1
    with pytest.raises(ValueError, match="reward.verify_workers=-1 must be >= 0"):
        AnswerGrader(num_workers=-1)
    with pytest.raises(ValueError, match="reward.verify_timeout_s=0 must be > 0"):
        AnswerGrader(timeout_s=0)
