"""Final-answer extraction from a response's text.

The answer is the content of the last `\\boxed{...}` (or `\\fbox{...}`), with nested braces;
`\\boxed 5` without braces also counts. `lenient` mode falls back to "the answer is X" /
"final answer: X" when there is no box. Everything is a linear scan: a response is model output,
and a pathological one (thousands of nested or unclosed braces) must not stall the step.
"""

from __future__ import annotations

import re

MODES = ("strict", "lenient")
_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_STATED = re.compile(r"(?:final answer|the answer)\s*(?:is|:)\s*:?", re.IGNORECASE)


def extract_answer(text: str, mode: str = "strict") -> str | None:
    """The final answer of `text`, or None when there is none (the answer then does not vote)."""
    if mode not in MODES:
        raise ValueError(f"reward.extraction={mode!r} is not one of {', '.join(MODES)}")
    boxes = [m.end() for m in _BOX.finditer(text)]
    if boxes:
        return _box_content(text, boxes[-1])
    if mode == "lenient":
        stated = [m.end() for m in _STATED.finditer(text)]
        if stated:
            answer = text[stated[-1]:].strip().split("\n", 1)[0].strip().strip("$").strip()
            answer = answer[:-1].strip() if answer.endswith(".") else answer
            return answer or None
    return None


def _box_content(text: str, start: int) -> str | None:
    """Content of the box whose command ends at `start`; None if it is empty or never closed."""
    i = start
    while i < len(text) and text[i] == " ":
        i += 1
    if i == len(text):
        return None
    if text[i] != "{":  # \boxed 5: up to the next space or math delimiter
        match = re.match(r"[^\s$]+", text[i:])
        return match.group(0) if match else None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                content = text[i + 1:j].strip()
                return content or None
    return None  # truncated before the box closed: no answer
