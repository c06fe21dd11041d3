"""The answer format: how a prompt asks for the final answer, and how it is read back.

Data (the prompt template, gold answers taken from worked solutions), the built-in models (whose
tokenizer holds the instruction as one token) and the reward all follow it, so it sits below them.
The answer is the content of the last `\\boxed{...}` (or `\\fbox{...}`), with nested braces;
`\\boxed 5` without braces also counts. `lenient` mode falls back to "the answer is X" /
"final answer: X" when there is no box. Everything is a linear scan: a response is model output,
and a pathological one (thousands of nested or unclosed braces) must not stall the step.
"""

from __future__ import annotations

import re

from megatron_mgrpo.config import EXTRACTION_MODES

#: appended to every question: the model is asked for a boxed final answer, which extraction reads
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_STATED = re.compile(r"(?:final answer|the answer)\s*(?:is|:)\s*:?", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?:\s|$)")


def extract_answer(text: str, mode: str = "strict") -> str | None:
    """The final answer of `text`, or None when there is none (the answer then does not vote)."""
    if mode not in EXTRACTION_MODES:
        raise ValueError(f"reward.extraction={mode!r} is not one of {', '.join(EXTRACTION_MODES)}")
    boxes = [m.end() for m in _BOX.finditer(text)]
    if boxes:
        return _box_content(text, boxes[-1])
    if mode == "lenient":
        stated = [m.end() for m in _STATED.finditer(text)]
        if stated:
            return _stated_answer(text[stated[-1]:])
    return None


def _stated_answer(rest: str) -> str | None:
    """The rest of the sentence after "the answer is": up to a period that ends it (not the one
    in 3.5) or the end of the line, without `$` or markdown `**` around it."""
    line = rest.strip().split("\n", 1)[0]
    sentence = _SENTENCE_END.split(line, maxsplit=1)[0]
    return sentence.strip().strip("*$").strip() or None


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
