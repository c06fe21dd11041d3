import time

import pytest

from megatron_mgrpo.reward import extract_answer


@pytest.mark.parametrize("text, expected", [
    (r"so \boxed{42}.", "42"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"first \boxed{1} then \boxed{ 2 }", "2"),
    (r"\fbox{x+1}", "x+1"),
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
    (r"nested \boxed{a_{b_{c}}} end", "a_{b_{c}}"),
    (r"$\boxed 5$", "5"),
    (r"\boxed{}", None),
    (r"truncated \boxed{12", None),
    ("no answer here", None),
    (r"\boxedx{3}", None),
])
def test_strict(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("So the answer is 7.", "7"),
    ("Final answer: $\\frac{3}{4}$", "\\frac{3}{4}"),
    ("The answer is 3.\nThen the answer is 5.", "5"),
    (r"the answer is 3 but \boxed{4}", "4"),
    ("nothing", None),
])
def test_lenient_falls_back_to_stated_answers(text, expected):
    assert extract_answer(text, "lenient") == expected
    if "boxed" not in text:
        assert extract_answer(text, "strict") is None


@pytest.mark.parametrize("text", ["\\boxed{" * 20000, "{" * 50000 + "\\boxed{1" + "}" * 10, "\\boxed" * 20000,
                                  "the answer is " * 20000])
def test_pathological_inputs_finish_fast(text):
    start = time.perf_counter()
    extract_answer(text, "lenient")
    assert time.perf_counter() - start < 1.0


def test_unknown_mode():
    with pytest.raises(ValueError, match="reward.extraction='loose'"):
        extract_answer("x", "loose")
