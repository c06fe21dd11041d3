"""Answer equivalence: which extracted answers mean the same thing, graded by a pool of workers.

Two layers. Answers with the same canonical string (`canonical.py`) are the same answer, for
free. Symbolic equivalence (`symbolic.py`: math-verify, 1/2 = 0.5, 2 sqrt 2 = sqrt 8, sets,
percents) runs only between the *distinct* canonical forms of a prompt, so 32 answers with 5
distinct forms cost 5 parses and at most 10 comparisons instead of 496. The forms are visited
in sorted order, so the grouping does not depend on the order of the answers even where
math-verify's lenient judgement is not transitive. A prompt whose distinct forms are all
integers or plain words (GSM8K, AIME and the built-in tasks, nearly always) has nothing for
math-verify to decide and never reaches a worker.

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
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

from megatron_mgrpo.reward.canonical import apart_by_form, canonical_form
from megatron_mgrpo.reward.symbolic import SymbolicGrouper

log = logging.getLogger(__name__)

_STARTUP_TIMEOUT_S = 120.0


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
        pending = deque(i for i, forms in enumerate(requests) if len(forms) > 1 and not apart_by_form(forms))
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
