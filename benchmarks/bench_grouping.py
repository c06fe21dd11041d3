"""Answer grouping for one realistic step: 8 prompts x 32 answers in mixed formats.

Ours: `AnswerGrader.group_many` (canonical-string classes, math-verify only between class
leaders, one worker request per prompt). Baseline, in the same run: naive all-pairs
math-verify, `verify(parse(a), parse(b))` for every pair of answers, as a straightforward
implementation would do. Both must give the same vote labels. A second baseline parses each
answer once and then compares all pairs, to show how much is parsing and how much is pairing.
Run: python benchmarks/bench_grouping.py
"""

import logging
import random
import time

from math_verify import parse, verify

from megatron_mgrpo.reward import AnswerGrader, vote

logging.getLogger("math_verify").setLevel(logging.ERROR)

FORMS = {  # value -> ways a model writes it
    "1/2": ["0.5", r"\frac{1}{2}", r"\dfrac{1}{2}", r"\frac12", "1/2", "0.50"],
    "1000": ["1000", "1,000", r"1{,}000", "1000.0"],
    "sqrt8": [r"2\sqrt{2}", r"\sqrt{8}", r"2 \sqrt 2"],
    "12": ["12", "12.", r"\text{12}", "12.0"],
    "-3": ["-3", "-3.0", r"-\frac{6}{2}"],
    "set": [r"\{1,2\}", r"\{2,1\}", r"\{1, 2\}"],
}
WRONG = ["7", "13", r"\frac{1}{3}", "999", "x+1", "42", r"\pi", "garbage words"]


def make_step(prompts: int = 8, answers: int = 32, seed: int = 0) -> list[list[str | None]]:
    rng = random.Random(seed)
    step = []
    for _ in range(prompts):
        truth = rng.choice(list(FORMS))
        pool = []
        for _ in range(answers):
            roll = rng.random()
            if roll < 0.55:
                pool.append(rng.choice(FORMS[truth]))
            elif roll < 0.9:
                pool.append(rng.choice(WRONG + FORMS[rng.choice(list(FORMS))]))
            else:
                pool.append(None)  # no \boxed{}: does not vote
        step.append(pool)
    return step


def naive_group(answers: list[str | None], parse_once: bool) -> list[int | None]:
    """Union-find over all pairs of answers, each pair checked with math-verify."""
    index = [i for i, a in enumerate(answers) if a is not None]
    cache = {i: parse(f"${answers[i]}$", parsing_timeout=None) for i in index} if parse_once else None
    parent = {i: i for i in index}

    def root(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for x, i in enumerate(index):
        for j in index[x + 1:]:
            a = cache[i] if parse_once else parse(f"${answers[i]}$", parsing_timeout=None)
            b = cache[j] if parse_once else parse(f"${answers[j]}$", parsing_timeout=None)
            if answers[i] == answers[j] or verify(a, b, timeout_seconds=None):
                parent[root(j)] = root(i)
    ids: dict[int, int] = {}
    return [None if a is None else ids.setdefault(root(i), len(ids)) for i, a in enumerate(answers)]


def main() -> None:
    step = make_step()
    with AnswerGrader(num_workers=1) as grader:
        grader.group_many(make_step(seed=99))  # start the worker, import sympy: not part of a step
        start = time.perf_counter()
        ours = grader.group_many(step)
        ours_s = time.perf_counter() - start
        labels = [vote(pool, grader, classes=c).label for pool, c in zip(step, ours)]
        stats = grader.stats
        baselines = {}
        for parse_once in (False, True):
            start = time.perf_counter()
            naive = [naive_group(pool, parse_once) for pool in step]
            baselines[parse_once] = time.perf_counter() - start
            naive_labels = [vote(pool, grader, classes=c).label for pool, c in zip(step, naive)]
            assert [vote(p, grader, classes=c).share for p, c in zip(step, naive)] == \
                [vote(p, grader, classes=c).share for p, c in zip(step, ours)], "different vote shares"
            assert naive_labels == labels, f"labels differ: {naive_labels} vs {labels}"
    print(f"8 prompts x 32 answers; labels identical: {labels}")
    print(f"ours: {ours_s * 1000:.0f} ms  ({stats.verify_calls} verify calls, {stats.parses} parses)")
    print(f"naive all-pairs, parse per pair: {baselines[False] * 1000:.0f} ms")
    print(f"naive all-pairs, parse once:     {baselines[True] * 1000:.0f} ms")
    print(f"speed-up vs naive all-pairs (parse once): {baselines[True] / ours_s:.1f}x")
    print(f"speed-up vs naive all-pairs math-verify: {baselines[False] / ours_s:.1f}x")


if __name__ == "__main__":
    main()
