"""Turning a question into the text the model sees.

Both modes ask for the final answer in \\boxed{}, which is what extraction and voting read. Few-
shot examples are chosen per question from a pool, deterministically (seeded by the question's
id, so every process and rerun renders the same prompt), never including the question itself.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from typing import Any

from megatron_mgrpo.answer_format import INSTRUCTION
from megatron_mgrpo.config import TEMPLATE_MODES
from megatron_mgrpo.data.records import PromptRecord


class PromptTemplate:
    def __init__(self, tokenizer: Any = None, mode: str = "auto", few_shot: int = 0,
                 examples: Sequence[PromptRecord] = (), seed: int = 0):
        if mode not in TEMPLATE_MODES:
            raise ValueError(f"data.template={mode!r} is not one of {', '.join(TEMPLATE_MODES)}")
        has_chat = tokenizer is not None and getattr(tokenizer, "chat_template", None)
        if mode == "chat" and not has_chat:
            raise ValueError("data.template=chat needs a tokenizer with a chat template; use data.template=plain")
        usable = [e for e in examples if e.gold_answer is not None or e.solution is not None]
        if few_shot > len(usable) - 1 and few_shot > 0:
            raise ValueError(f"data.few_shot={few_shot} needs at least {few_shot + 1} examples with answers "
                             f"(one may be the question itself); got {len(usable)}")
        self.tokenizer = tokenizer
        self.chat = mode == "chat" or (mode == "auto" and bool(has_chat))
        self.few_shot, self.examples, self.seed = few_shot, usable, seed

    def shots(self, record: PromptRecord) -> list[PromptRecord]:
        if not self.few_shot:
            return []
        digest = hashlib.sha256(f"{self.seed}:{record.id}".encode()).digest()
        pool = [e for e in self.examples if e.id != record.id and e.question != record.question]
        return random.Random(digest).sample(pool, self.few_shot)

    def encode(self, record: PromptRecord) -> list[int]:
        """Token ids of the rendered prompt; the text already holds every special token it needs."""
        return self.tokenizer(self.render(record), add_special_tokens=False)["input_ids"]

    def render(self, record: PromptRecord) -> str:
        turns = [(e.question, _worked(e)) for e in self.shots(record)]
        if self.chat:
            messages = []
            for question, answer in turns:
                messages += [{"role": "user", "content": f"{question}\n{INSTRUCTION}"},
                             {"role": "assistant", "content": answer}]
            messages.append({"role": "user", "content": f"{record.question}\n{INSTRUCTION}"})
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        blocks = [f"Question: {q}\nAnswer: {a}\n\n" for q, a in turns]
        return "".join(blocks) + f"Question: {record.question}\n{INSTRUCTION}\nAnswer:"


def _worked(example: PromptRecord) -> str:
    """An example's answer text, ending in \\boxed{answer}."""
    if example.solution and "\\boxed" in example.solution:
        return example.solution
    boxed = f"\\boxed{{{example.gold_answer}}}" if example.gold_answer is not None else ""
    return f"{example.solution}\n{boxed}".strip() if example.solution else f"The answer is {boxed}."
