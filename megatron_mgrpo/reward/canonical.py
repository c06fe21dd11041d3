"""Canonical answer strings: a conservative normal form (spacing, `\\left`/`\\right`, `\\dfrac`,
`$`, `\\text{}`, thousands separators, a trailing period, trailing decimal zeros) under which
answers written differently but meaning the same are one string, for free; and the forms that
no symbolic check can merge (distinct integers, plain words)."""

from __future__ import annotations

import re
from decimal import Context, Decimal

_SPACING = re.compile(r"\\(?:left|right|displaystyle)(?![A-Za-z])|\\[!,;: ]|~")
_TEXT = re.compile(r"\\(?:text|textrm|textit|textbf|mbox|mathrm)\{([^{}]*)\}")
_SPACE = re.compile(r"\s+")
_OUTER_DOLLARS = re.compile(r"^\$+|(?<!\\)\$+$")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_DECIMAL = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")
_WORDS = re.compile(r"[A-Za-z]+(?: [A-Za-z]+)*")
_INTEGER = re.compile(r"-?\d+")


def canonical_form(answer: str) -> str:
    """A normal form that only merges answers written differently but meaning the same thing."""
    s = answer.replace("\u2212", "-")
    s = _SPACING.sub("", s)
    while (unwrapped := _TEXT.sub(r"\1", s)) != s:  # nested wrappers: innermost first
        s = unwrapped
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("{,}", ",")
    s = re.sub(r"(?<!\\)%", r"\\%", s)
    s = _SPACE.sub(_drop_space, s.strip())
    s = _strip_period(_OUTER_DOLLARS.sub("", _strip_period(s)))
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    if _DECIMAL.fullmatch(s):  # 12.0, 12.00 and 12 are the same number: exact decimal arithmetic
        s = format(Decimal(s).normalize(Context(prec=len(s) + 1)), "f")
        s = "0" if s == "-0" else s
    return s


def _drop_space(match: re.Match) -> str:
    """Spacing carries no meaning, except between letters: "\\pi r" is not "\\pir"."""
    text, start, end = match.string, match.start(), match.end()
    return " " if text[start - 1].isalpha() and text[end].isalpha() else ""


def is_words(text: str) -> bool:
    """Plain words ("Tuesday", "no solution"), not a product of one- or two-letter symbols."""
    return _WORDS.fullmatch(text) is not None and sum(c.isalpha() for c in text) >= 3


def apart_by_form(forms: list[str]) -> bool:
    """Whether no two of these distinct canonical forms can be equivalent: each is an integer (the
    canonical form of a number is unique: no sign of zero, no leading or trailing zeros) or plain
    words. `SymbolicGrouper.merge` would keep them all apart too: integers compare by exact value
    and words never merge."""
    return all(_INTEGER.fullmatch(form) or is_words(form) for form in forms)


def _strip_period(s: str) -> str:
    """Drop one sentence-ending period, never an ellipsis ("1, 2, ...")."""
    return s[:-1] if s.endswith(".") and not s.endswith("..") else s
