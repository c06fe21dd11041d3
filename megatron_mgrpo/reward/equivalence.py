"""Answer equivalence: which extracted answers mean the same thing.

Two layers. First a conservative canonical string (spacing, `\\left`/`\\right`, `\\dfrac`, `$`,
`\\text{}`, thousands separators, a trailing period, trailing decimal zeros): answers with the
same canonical string are the same answer, for free. Then math-verify (symbolic equivalence:
1/2 = 0.5, 2 sqrt 2 = sqrt 8, sets, percents) runs only between the *distinct* canonical
classes, comparing each class with the leaders of the classes found so far, so 32 answers with
5 distinct forms cost 5 parses and at most 10 comparisons instead of 496. Two answers that are
both plain numbers with clearly different values cannot be equivalent, so that pair skips the
symbolic comparison altogether.

math-verify parses with sympy, which can take unbounded time on hostile LaTeX, and its own
timeouts only work in a process's main thread. So it runs in worker processes: one request per
prompt, a deadline per request, and a worker that misses its deadline is killed and replaced.
A timed-out request is a counted event whose answers are treated as not equivalent beyond
their canonical strings; training never hangs on grading. Each worker keeps a parse cache, so
an answer string is parsed once per worker lifetime.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import re
from dataclasses import dataclass
from decimal import Decimal
from multiprocessing.connection import Connection

log = logging.getLogger(__name__)

_SPACING = re.compile(r"\\left|\\right|\\[!,;: ]|~")
_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\{([^{}]*)\}")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_DECIMAL = re.compile(r"-?\d+(?:\.\d*)?")


def canonical_form(answer: str) -> str:
    """A normal form that only ever merges answers that are written-differently-but-identical."""
    s = _TEXT.sub(r"\1", _SPACING.sub("", answer))
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\s+", "", s).rstrip(".").strip("$").rstrip(".")
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    if _DECIMAL.fullmatch(s):  # 12.0, 12.00 and 12 are the same number: exact decimal arithmetic
        s = format(Decimal(s).normalize(), "f")
    return s


@dataclass
class GraderStats:
    """Counters for metrics: how much symbolic work grading did, and what went wrong."""

    requests: int = 0
    verify_calls: int = 0
    parses: int = 0
    cache_hits: int = 0
    parse_failures: int = 0
    timeouts: int = 0


# ------------------------------------------------------------------------------------------------
# the symbolic part: runs in a worker process (or in-process with num_workers=0)


class _SymbolicGrouper:
    """Merges canonical classes with math-verify; owns the parse cache."""

    def __init__(self, cache_size: int = 100_000):
        from math_verify import parse, verify

        logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns that we disabled its timeouts
        self._parse, self._verify = parse, verify
        self._cache: dict[str, object] = {}
        self._cache_size = cache_size

    def parsed(self, text: str, counts: dict) -> tuple[object, float | None]:
        """(math-verify parse, numeric value when the answer is a plain real number)."""
        if text in self._cache:
            counts["cache_hits"] += 1
            return self._cache[text]
        counts["parses"] += 1
        value = self._parse(f"${text}$", parsing_timeout=None)
        if not value:
            counts["parse_failures"] += 1
        if len(self._cache) >= self._cache_size:
            self._cache.pop(next(iter(self._cache)))
        self._cache[text] = (value, _numeric_value(value))
        return self._cache[text]

    def merge(self, representatives: list[str]) -> tuple[list[int], dict]:
        """For each representative, the index of the first representative it is equivalent to."""
        counts = {"verify_calls": 0, "parses": 0, "cache_hits": 0, "parse_failures": 0}
        leaders: list[int] = []
        merged_into = []
        for i, text in enumerate(representatives):
            mine, my_number = self.parsed(text, counts)
            target = i
            for leader in leaders if mine else ():
                theirs, their_number = self.parsed(representatives[leader], counts)
                if not theirs or _clearly_different(my_number, their_number):
                    continue
                counts["verify_calls"] += 1
                if self._verify(theirs, mine, timeout_seconds=None):
                    target = leader
                    break
            if target == i:
                leaders.append(i)
            merged_into.append(target)
        return merged_into, counts


def _numeric_value(parsed: object) -> float | None:
    """The value of a parse that is a single real number (sympy), else None."""
    try:
        expr = parsed[0]
        if getattr(expr, "is_number", False) and expr.is_real:
            return float(expr)
    except (IndexError, TypeError, ValueError, OverflowError, AttributeError):
        pass
    return None


def _clearly_different(a: float | None, b: float | None) -> bool:
    """Numbers that no rounding math-verify applies (6 decimals) could make equal."""
    return a is not None and b is not None and abs(a - b) > 1e-5 * max(1.0, abs(a), abs(b))


def _worker_main(conn: Connection) -> None:
    grouper = _SymbolicGrouper()
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        if request is None:
            return
        conn.send(grouper.merge(request))


class _Worker:
    def __init__(self, context):
        self._context = context
        self._start()

    def _start(self) -> None:
        self.conn, child = self._context.Pipe()
        self.process = self._context.Process(target=_worker_main, args=(child,), daemon=True)
        self.process.start()
        child.close()

    def restart(self) -> None:
        self.process.kill()
        self.process.join()
        self.conn.close()
        self._start()

    def close(self) -> None:
        try:
            self.conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


# ------------------------------------------------------------------------------------------------


class AnswerGrader:
    """Groups extracted answers into equivalence classes.

    num_workers >= 1 runs math-verify in that many worker processes with `timeout_s` per
    request; num_workers = 0 runs it in this process without timeout protection (debugging only).
    Use as a context manager, or call `close()`.
    """

    def __init__(self, num_workers: int = 1, timeout_s: float = 5.0):
        if num_workers < 0:
            raise ValueError(f"reward.verify_workers={num_workers} must be >= 0")
        if timeout_s <= 0:
            raise ValueError(f"reward.verify_timeout_s={timeout_s} must be > 0")
        self.timeout_s = timeout_s
        self.stats = GraderStats()
        context = mp.get_context("spawn")  # no fork of a process that may hold torch / gloo threads
        self._workers = [_Worker(context) for _ in range(num_workers)]
        self._local = _SymbolicGrouper() if num_workers == 0 else None

    def group_answers(self, answers: list[str | None]) -> list[int | None]:
        """Class id per answer (0, 1, ... in order of first appearance); None for no answer."""
        return self.group_many([answers])[0]

    def group_many(self, groups: list[list[str | None]]) -> list[list[int | None]]:
        """`group_answers` for several prompts, spread over the workers in parallel."""
        canon = [[canonical_form(a) if a is not None and a.strip() else None for a in answers] for answers in groups]
        representatives = [list(dict.fromkeys(c for c in forms if c)) for forms in canon]
        merged = self._merge_all(representatives)
        results = []
        for forms, reps, merged_into in zip(canon, representatives, merged):
            leader_of = {rep: reps[target] for rep, target in zip(reps, merged_into)}
            ids: dict[str, int] = {}
            results.append([None if f is None else ids.setdefault(leader_of[f], len(ids)) for f in forms])
        return results

    def equivalent(self, a: str, b: str) -> bool:
        first, second = self.group_answers([a, b])
        return first is not None and first == second

    def _merge_all(self, representatives: list[list[str]]) -> list[list[int]]:
        results: list[list[int] | None] = [list(range(len(r))) if len(r) <= 1 else None for r in representatives]
        pending = [i for i, r in enumerate(results) if r is None]
        self.stats.requests += len(representatives)
        if self._local is not None:
            for i in pending:
                results[i] = self._record(*self._local.merge(representatives[i]))
            return results
        while pending:
            wave, pending = pending[:len(self._workers)], pending[len(self._workers):]
            for worker, i in zip(self._workers, wave):
                worker.conn.send(representatives[i])
            for worker, i in zip(self._workers, wave):
                if worker.conn.poll(self.timeout_s):
                    results[i] = self._record(*worker.conn.recv())
                else:  # hostile input: no merges beyond canonical strings, fresh worker
                    self.stats.timeouts += 1
                    log.warning("answer equivalence timed out after %.1f s on %d answers; worker restarted",
                                self.timeout_s, len(representatives[i]))
                    worker.restart()
                    results[i] = list(range(len(representatives[i])))
        return results

    def _record(self, merged_into: list[int], counts: dict) -> list[int]:
        for name, value in counts.items():
            setattr(self.stats, name, getattr(self.stats, name) + value)
        return merged_into

    def close(self) -> None:
        for worker in self._workers:
            worker.close()
        self._workers = []

    def __enter__(self) -> AnswerGrader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
