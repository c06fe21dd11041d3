"""Symbolic equivalence of distinct canonical forms with math-verify (sympy), each form compared
with the leaders of the classes found so far; plain numbers are compared by value first (exact
for integers and fractions; a percent is its value / 100, so 50% = 0.5 but 50 != 50%), and a
plain-word answer equals only itself. Runs in a grading worker process (`equivalence.py`), or
in-process with num_workers=0."""

from __future__ import annotations

import logging
from typing import NamedTuple

from megatron_mgrpo.reward.canonical import is_words


class _Parsed(NamedTuple):
    expressions: list  # math-verify's parse: sympy objects and their string forms
    exact: object | None  # the sympy Rational when the answer is one (integers, fractions)
    approx: float | None  # the value when the answer is a single real number


class SymbolicGrouper:
    """Merges canonical forms with math-verify; owns the parse cache."""

    def __init__(self, cache_size: int = 100_000):
        from math_verify import LatexExtractionConfig, parse, verify

        logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns that we disabled its timeouts
        self._parse, self._verify = parse, verify
        # The whole string is the answer: no fallback that hunts for a number in it ("2**3" -> 2).
        self._config = [LatexExtractionConfig()]
        self._cache: dict[str, _Parsed | None] = {}
        self._cache_size = cache_size

    def parsed(self, text: str, counts: dict[str, int]) -> _Parsed | None:
        """The math-verify parse of `text` (cached), or None when it is not mathematics."""
        if text in self._cache:
            counts["cache_hits"] += 1
            return self._cache[text]
        counts["parses"] += 1
        expressions = self._parse(f"${text}$", extraction_config=self._config, parsing_timeout=None)
        result = _Parsed(expressions, *_numeric_value(expressions)) if _has_math(expressions) else None
        counts["parse_failures"] += result is None
        if len(self._cache) >= self._cache_size:
            self._cache.pop(next(iter(self._cache)))
        self._cache[text] = result
        return result

    def merge(self, forms: list[str]) -> tuple[list[int], dict[str, int]]:
        """For each canonical form, the index of the first (leading) form it is equivalent to.

        With an equivalence relation this is union-find with fewer comparisons: a form joins
        the first class whose leader it matches, and is never compared with the other members.
        """
        counts = {"verify_calls": 0, "parses": 0, "cache_hits": 0, "parse_failures": 0}
        parses = [None if is_words(text) else self.parsed(text, counts) for text in forms]
        leaders: list[int] = []
        merged_into = []
        for i, mine in enumerate(parses):
            target = i
            for leader in leaders if mine else ():
                theirs = parses[leader]
                if theirs is None:
                    continue
                same_number = _same_number(mine, theirs)
                if same_number is None:
                    counts["verify_calls"] += 1
                    same_number = self._verify(theirs.expressions, mine.expressions, timeout_seconds=None)
                if same_number:
                    target = leader
                    break
            if target == i:
                leaders.append(i)
            merged_into.append(target)
        return merged_into, counts


def _has_math(expressions: list) -> bool:
    """math-verify returns only the input string when LaTeX parsing failed."""
    return any(not isinstance(e, str) for e in expressions)


def _numeric_value(expressions: list) -> tuple[object | None, float | None]:
    """(exact Rational, float value) of a parse that is a single real number; None where not."""
    from sympy import UnevaluatedExpr

    expr = expressions[0]
    if not getattr(expr, "is_number", False):  # free symbols, sets, matrices, strings
        return None, None
    expr = expr.xreplace({u: u.args[0] for u in expr.atoms(UnevaluatedExpr)})  # 50\% is 50 * (1/100) kept apart
    try:
        value = complex(expr.evalf())
    except (TypeError, ValueError, OverflowError):  # zoo, nan
        return None, None
    if value.imag != 0:
        return None, None
    return (expr if expr.is_Rational else None), value.real


def _same_number(a: _Parsed, b: _Parsed) -> bool | None:
    """For two plain numbers: equal or not; None when math-verify must decide.

    Integers and fractions compare exactly (10^20 and 10^20 + 1 differ, though their floats do
    not). Other numbers are only told apart, with a margin far above math-verify's own rounding
    (6 decimals), so this agrees with math-verify except on percents: here 50% is 0.5 and never 50.
    """
    if a.exact is not None and b.exact is not None:
        return a.exact == b.exact
    if a.approx is None or b.approx is None:
        return None
    if abs(a.approx - b.approx) > 1e-5 * max(1.0, abs(a.approx), abs(b.approx)):
        return False
    return None
