"""Answer grouping for one realistic step: 8 prompts x 32 answers in mixed formats.

Ours: `AnswerGrader.group_many` (canonical-string classes, math-verify only between class
leaders, one worker request per prompt). Baseline, in the same run and on the same answers:
naive all-pairs math-verify in-process, each answer parsed once and every pair of distinct
answer strings verified, classes joined with union-find. Both must give the same vote labels
and shares. Run: python benchmarks/bench_grouping.py
"""

import logging
import random
import time

from math_verify import parse, verify

from megatron_mgrpo.reward import AnswerGrader, GraderStats, vote

FORMS = {  # value -> ways a model writes it
    "1/2": ["0.5", r"\frac{1}{2}", r"\dfrac{1}{2}", r"\dfrac12", r"\frac12", "1/2", "0.50"],
    "1000": ["1000", "1,000", r"1{,}000", "1000.0"],
    "sqrt8": [r"2\sqrt{2}", r"\sqrt{8}", r"2 \sqrt 2"],
    "12": ["12", "12.", r"\text{12}", "12.0"],
    "-3": ["-3", "-3.0", r"-\frac{6}{2}"],
    "set": [r"\{1,2\}", r"\{2,1\}", r"\{1, 2\}"],
}
WRONG = ["7", "13", r"\frac{1}{3}", "999", "x+1", "42", r"\pi", "garbage words"]
# A previous step: the same kinds of answers with other values, so both sides start with sympy
# and the LaTeX parser warm, but no answer string of the measured step is cached.
WARM_UP = ["0.25", r"\frac{3}{4}", r"\dfrac34", "2,000", r"3\sqrt{3}", r"\text{5}", r"-\frac{8}{2}", r"\{5,6\}",
           "y-2", r"\sqrt{5}", "6.0", r"\infty", "other words"]


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


def naive_group(answers: list[str | None]) -> list[int | None]:
    """Union-find over all pairs of answers, each pair of different strings checked with math-verify."""
    index = [i for i, a in enumerate(answers) if a is not None]
    parsed = {i: parse(f"${answers[i]}$", parsing_timeout=None) for i in index}
    parent = {i: i for i in index}

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for x, i in enumerate(index):
        for j in index[x + 1:]:
            if answers[i] == answers[j] or verify(parsed[i], parsed[j], timeout_seconds=None):
                parent[root(j)] = root(i)
    ids: dict[int, int] = {}
    return [None if a is None else ids.setdefault(root(i), len(ids)) for i, a in enumerate(answers)]


def main() -> None:
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    step = make_step()
    with AnswerGrader(num_workers=1) as grader:
        grader.group_answers(WARM_UP)
        grader.stats = GraderStats()
        start = time.perf_counter()
        ours = grader.group_many(step)
        ours_s = time.perf_counter() - start
        stats = grader.stats
        naive_group(WARM_UP)
        start = time.perf_counter()
        naive = [naive_group(pool) for pool in step]
        naive_s = time.perf_counter() - start
        ours_votes = [vote(pool, grader, classes=c) for pool, c in zip(step, ours)]
        naive_votes = [vote(pool, grader, classes=c) for pool, c in zip(step, naive)]
    labels = [v.label for v in ours_votes]
    assert labels == [v.label for v in naive_votes], f"labels differ: {labels} vs {[v.label for v in naive_votes]}"
    assert [v.share for v in ours_votes] == [v.share for v in naive_votes], "vote shares differ"
    pairs = sum(a != b for pool in step for x, a in enumerate(pool) for b in pool[x + 1:]
                if a is not None and b is not None)
    print(f"8 prompts x 32 answers; vote labels identical: {labels}")
    print(f"ours:  {ours_s * 1000:6.0f} ms  ({stats.parses} parses, {stats.verify_calls} verify calls, "
          f"1 worker process)")
    print(f"naive: {naive_s * 1000:6.0f} ms  (parse each answer once, {pairs} verify calls, in-process)")
    print(f"speed-up vs naive all-pairs math-verify: {naive_s / ours_s:.1f}x")


if __name__ == "__main__":
    main()
