"""Answer equivalence: which extracted answers mean the same thing.

Two layers. First a conservative canonical string (spacing, `\\left`/`\\right`, `\\dfrac`, `$`,
`\\text{}`, thousands separators, a trailing period, trailing decimal zeros): answers with the
same canonical string are the same answer, for free. Then math-verify (symbolic equivalence:
1/2 = 0.5, 2 sqrt 2 = sqrt 8, sets, percents) runs only between the *distinct* canonical forms
of a prompt, each compared with the leaders of the classes found so far, so 32 answers with 5
distinct forms cost 5 parses and at most 10 comparisons instead of 496. The forms are visited
in sorted order, so the grouping does not depend on the order of the answers even where
math-verify's lenient judgement is not transitive. Two cheap checks skip the symbolic
comparison: plain numbers are compared by value (integers and fractions exactly; a percent is
its value / 100, so 50% = 0.5 but 50 != 50%, where math-verify alone merges 50% with both), and
a plain-word answer ("Tuesday") equals only itself (math-verify reads words as products of
symbols, where anagrams are equal). A prompt whose distinct forms are all integers or words
(GSM8K, AIME and the built-in tasks, nearly always) has nothing for math-verify to decide:
distinct integer forms are distinct values, and a word equals only itself; it never reaches a
worker.

math-verify parses with sympy, which can take unbounded time on hostile LaTeX, and its own
timeouts only work in a process's main thread. So it runs in worker processes with its own
timeouts off: one request per prompt, a deadline per request, and a worker that misses its
deadline is killed and replaced. A timed-out request is a counted event whose answers are
treated as not equivalent beyond their canonical strings; training never hangs on grading.
Each worker keeps a parse cache, so an answer string is parsed once per worker lifetime.
Workers are spawned, so a script that builds an `AnswerGrader` needs an
`if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import re
import time
from collections import deque
from dataclasses import dataclass
from decimal import Context, Decimal
from multiprocessing.connection import Connection, wait
from typing import NamedTuple

log = logging.getLogger(__name__)

_SPACING = re.compile(r"\\(?:left|right|displaystyle)(?![A-Za-z])|\\[!,;: ]|~")
_TEXT = re.compile(r"\\(?:text|textrm|textit|textbf|mbox|mathrm)\{([^{}]*)\}")
_SPACE = re.compile(r"\s+")
_OUTER_DOLLARS = re.compile(r"^\$+|(?<!\\)\$+$")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_DECIMAL = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")
_WORDS = re.compile(r"[A-Za-z]+(?: [A-Za-z]+)*")
_INTEGER = re.compile(r"-?\d+")
_STARTUP_TIMEOUT_S = 120.0


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


def _is_words(text: str) -> bool:
    """Plain words ("Tuesday", "no solution"), not a product of one- or two-letter symbols."""
    return _WORDS.fullmatch(text) is not None and sum(c.isalpha() for c in text) >= 3


def _apart_by_form(forms: list[str]) -> bool:
    """Whether no two of these distinct canonical forms can be equivalent: each is an integer (the
    canonical form of a number is unique: no sign of zero, no leading or trailing zeros) or plain
    words. `SymbolicGrouper.merge` would keep them all apart too: integers compare by exact value
    and words never merge."""
    return all(_INTEGER.fullmatch(form) or _is_words(form) for form in forms)


def _strip_period(s: str) -> str:
    """Drop one sentence-ending period, never an ellipsis ("1, 2, ...")."""
    return s[:-1] if s.endswith(".") and not s.endswith("..") else s


@dataclass
class GraderStats:
    """Counters for metrics: how much symbolic work grading did, and what went wrong."""

    requests: int = 0
    verify_calls: int = 0
    parses: int = 0
    cache_hits: int = 0
    parse_failures: int = 0
    timeouts: int = 0
    worker_crashes: int = 0


# ------------------------------------------------------------------------------------------------
# the symbolic part: runs in a worker process (or in-process with num_workers=0)


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
        parses = [None if _is_words(text) else self.parsed(text, counts) for text in forms]
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


def _worker_main(conn: Connection, grouper_type: type[SymbolicGrouper]) -> None:
    grouper = grouper_type()
    conn.send("ready")
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        if request is None:
            return
        conn.send(grouper.merge(request))


class _Worker:
    """One grading process and its pipe; `restart` replaces a stuck or dead one."""

    def __init__(self, context: mp.context.BaseContext, grouper_type: type[SymbolicGrouper]):
        self._context, self._grouper_type = context, grouper_type
        self._start()

    def _start(self) -> None:
        self.conn, child = self._context.Pipe()
        self.process = self._context.Process(target=_worker_main, args=(child, self._grouper_type), daemon=True)
        self.process.start()
        child.close()
        self.started = False

    def send(self, forms: list[str]) -> None:
        """Hand a request over; the first one waits until the worker has imported math-verify,
        so start-up time never counts against a request's deadline."""
        if not self.started:
            try:
                self.started = self.conn.poll(_STARTUP_TIMEOUT_S) and self.conn.recv() == "ready"
            except EOFError:  # it died while starting
                pass
            if not self.started:
                raise RuntimeError(f"answer-grading worker did not start within {_STARTUP_TIMEOUT_S:.0f} s: "
                                   f"check that math-verify imports (python -c 'import math_verify')")
        self.conn.send(forms)

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

    num_workers >= 1 runs math-verify in that many worker processes with a deadline of
    `timeout_s` per prompt; num_workers = 0 runs it in this process without any timeout
    (debugging only: a hostile answer can hang the caller). Use as a context manager, or call
    `close()`. `stats` accumulates counters for metrics.
    """

    grouper_type: type[SymbolicGrouper] = SymbolicGrouper  # what a worker runs (a subclass must be importable)

    def __init__(self, num_workers: int = 1, timeout_s: float = 5.0):
        if num_workers < 0:
            raise ValueError(f"reward.verify_workers={num_workers} must be >= 0 (0 grades in-process)")
        if timeout_s <= 0:
            raise ValueError(f"reward.verify_timeout_s={timeout_s} must be > 0 seconds")
        self.timeout_s = timeout_s
        self.stats = GraderStats()
        context = mp.get_context("spawn")  # no fork of a process that may hold torch / gloo threads
        self._workers = [_Worker(context, self.grouper_type) for _ in range(num_workers)]
        self._local = self.grouper_type() if num_workers == 0 else None

    def group_answers(self, answers: list[str | None]) -> list[int | None]:
        """Class id per answer (0, 1, ... in order of first appearance); None for no answer."""
        return self.group_many([answers])[0]

    def group_many(self, groups: list[list[str | None]]) -> list[list[int | None]]:
        """`group_answers` for several prompts: one worker request per prompt, spread over the workers."""
        canon = [[_canonical_or_none(a) for a in answers] for answers in groups]
        distinct = [sorted({form for form in forms if form is not None}) for forms in canon]
        results = []
        for forms, sorted_forms, merged_into in zip(canon, distinct, self._merge_all(distinct)):
            leader_of = {form: sorted_forms[target] for form, target in zip(sorted_forms, merged_into)}
            ids: dict[str, int] = {}
            results.append([None if form is None else ids.setdefault(leader_of[form], len(ids)) for form in forms])
        return results

    def equivalent(self, a: str, b: str) -> bool:
        first, second = self.group_answers([a, b])
        return first is not None and first == second

    def _merge_all(self, requests: list[list[str]]) -> list[list[int]]:
        """Leader index per form, per request; a request that fails keeps every form apart."""
        results = [list(range(len(forms))) for forms in requests]
        pending = deque(i for i, forms in enumerate(requests) if len(forms) > 1 and not _apart_by_form(forms))
        self.stats.requests += len(requests)
        if self._local is not None:
            for i in pending:
                results[i] = self._record(*self._local.merge(requests[i]))
            return results
        idle, busy = list(self._workers), {}  # busy: worker -> (request index, deadline)
        while pending or busy:
            while pending and idle:
                worker, i = idle.pop(), pending.popleft()
                try:
                    worker.send(requests[i])
                except (BrokenPipeError, ConnectionResetError):  # it died while idle (killed, out of memory)
                    self.stats.worker_crashes += 1
                    log.warning("answer-grading worker had died while idle; restarted")
                    worker.restart()
                    worker.send(requests[i])
                busy[worker] = (i, time.monotonic() + self.timeout_s)
            soonest = min(deadline for _, deadline in busy.values())
            ready = wait([worker.conn for worker in busy], timeout=max(0.0, soonest - time.monotonic()))
            for worker, (i, deadline) in list(busy.items()):
                if worker.conn in ready:
                    try:
                        results[i] = self._record(*worker.conn.recv())
                    except EOFError:  # the worker died (e.g. out of memory in sympy)
                        self.stats.worker_crashes += 1
                        log.warning("answer-grading worker died on %d answers; restarted", len(requests[i]))
                        worker.restart()
                elif time.monotonic() >= deadline:  # hostile input: fresh worker, no symbolic merges
                    self.stats.timeouts += 1
                    log.warning("answer equivalence timed out after %.1f s on %d answers; worker restarted",
                                self.timeout_s, len(requests[i]))
                    worker.restart()
                else:
                    continue
                del busy[worker]
                idle.append(worker)
        return results

    def _record(self, merged_into: list[int], counts: dict[str, int]) -> list[int]:
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


def _canonical_or_none(answer: str | None) -> str | None:
    """Canonical form, or None for a missing or blank answer (it does not vote)."""
    if answer is None:
        return None
    return canonical_form(answer) or None
