import time

import hypothesis.strategies as st
import pytest
from hypothesis import given

from megatron_mgrpo.reward import extract_answer


@pytest.mark.parametrize("text, expected", [
    (r"so \boxed{42}.", "42"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"first \boxed{1} then \boxed{ 2 }", "2"),
    (r"\fbox{x+1}", "x+1"),
    (r"\boxed{3} and finally \fbox{4}", "4"),
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
    (r"nested \boxed{a_{b_{c}}} end", "a_{b_{c}}"),
    (r"$\boxed 5$", "5"),
    (r"\boxed {7}", "7"),
    (r"\boxed{}", None),
    (r"\boxed{  }", None),
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
    ("The answer is 3.5. That is all.", "3.5"),
    ("The final answer is: **12**", "12"),
    (r"the answer is 3 but \boxed{4}", "4"),
    ("the answer is .", None),
    ("nothing", None),
])
def test_lenient_falls_back_to_stated_answers(text, expected):
    assert extract_answer(text, "lenient") == expected
    if "boxed" not in text:
        assert extract_answer(text, "strict") is None


balanced = st.recursive(st.text(alphabet="abc123+-^_ \\", max_size=6),
                        lambda inner: st.builds(lambda a, b: f"{a}{{{b}}}", inner, inner), max_leaves=8)


@given(prefix=st.text(alphabet="xyz {}$.\n", max_size=20), answer=balanced,
       suffix=st.text(alphabet="xyz .\n", max_size=20))
def test_the_last_box_holds_the_answer_whatever_surrounds_it(prefix, answer, suffix):
    text = f"{prefix}\\boxed{{0}} {prefix}\\boxed{{{answer}}}{suffix}"
    assert extract_answer(text) == (answer.strip() or None)


@pytest.mark.parametrize("text, expected", [
    ("\\boxed{" * 20000, None),  # every box unclosed
    ("{" * 50000 + "\\boxed{1" + "}" * 10, "1"),
    ("\\boxed" * 20000, None),
    ("\\boxed{" + "{" * 10000 + "}" * 9999, None),  # 10k nested braces, one short of closing
    ("the answer is " * 20000, None),
], ids=["unclosed-boxes", "deep-braces-before", "bare-boxes", "nested-unclosed", "repeated-phrase"])
def test_pathological_inputs_finish_fast(text, expected):
    start = time.perf_counter()
    assert extract_answer(text, "lenient") == expected
    assert time.perf_counter() - start < 1.0


def test_unknown_mode():
    with pytest.raises(ValueError, match="reward.extraction='loose' is not one of strict, lenient"):
        extract_answer("x", "loose")
