"""One weight push to all the SGLang servers of a pool through their shared weight group.

A pool's servers synced with weight_sync='distributed' hold ranks 1..world_size-1 of one group
whose rank 0 is the trainer's `WeightBroadcaster` (`rank_offset` places each server's TP ranks).
A push asks every server to join at the first push (`/init_weights_update_group`), then for each
bucket names its tensors to every server (`/update_weights_from_distributed`) while rank 0
broadcasts them once for all: the whole model crosses the network once per push, not once per
server, and no file crosses a file system.

`EnginePool` receives this push from `pool_weight_push` and leaves its other engines to push
one by one; it drives the servers only through `SGLangEngine`'s weight-group methods.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, wait
from typing import Any

import httpx
import torch

from megatron_mgrpo.rollout.server import ServerError
from megatron_mgrpo.rollout.sglang_engine import SGLangEngine
from megatron_mgrpo.rollout.types import RolloutEngine
from megatron_mgrpo.sync.buckets import bucketize


def pool_weight_push(engines: Sequence[RolloutEngine]) -> DistributedPoolPush | None:
    """The group push for those of a pool's `engines` that are SGLang servers synced through a
    weight group (weight_sync='distributed', one group per pool), or None when there are none:
    every engine is then pushed to on its own."""
    grouped = [engine for engine in engines if isinstance(engine, SGLangEngine) and engine.weight_sync == "distributed"]
    return DistributedPoolPush(grouped) if grouped else None


class DistributedPoolPush:
    """One push to all the SGLang servers of a weight group (a pool's, in the trainer): each
    bucket is broadcast once by rank 0 and reaches every server at once, instead of the whole
    model being sent once per server.

    The servers' ranks must tile 1..world_size-1 of the group, or the rendezvous never completes.
    Every HTTP request of the protocol blocks until rank 0 has done its part (formed the group,
    sent the bucket), so the requests run in background threads while rank 0 does it. A push
    that fails leaves the group unusable (a server gone, a bucket half sent): it is closed, the
    push raises, and the next push forms a new group with all the servers.
    """

    def __init__(self, engines: Sequence[SGLangEngine]):
        self.engines = list(engines)
        self.broadcaster = self.engines[0].broadcaster
        if self.broadcaster is None or any(engine.broadcaster is not self.broadcaster for engine in self.engines):
            raise ValueError("a distributed push needs engines with weight_sync='distributed' sharing one "
                             "WeightBroadcaster")
        ranks = sorted(rank for engine in self.engines
                       for rank in range(engine.rank_offset, engine.rank_offset + engine.tp_size))
        if ranks != list(range(1, self.broadcaster.world_size)):
            raise ValueError(f"the servers {[engine.server.spec.url for engine in self.engines]} hold ranks {ranks} "
                             f"of weight group {self.broadcaster.group_name!r}, which needs exactly 1.."
                             f"{self.broadcaster.world_size - 1}: push through the EnginePool of all its servers, "
                             f"with rank offsets 1, 1 + tp_size, ...")

    def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Send the weights to every server; only once all have them are the snapshots (kept for
        restarts) and the versions moved on: after a failure the servers may hold part of them."""
        named = list(named_tensors)
        try:
            if self.broadcaster.group is None:
                self._form_group()
            self._send(named, version)
        except Exception as err:
            group = self.broadcaster.group_name
            self.broadcaster.close()
            raise ServerError(f"weights version {version} did not reach the servers of weight group {group!r}, "
                              f"which is closed (the next push forms a new one): {err}") from err
        for engine in self.engines:
            engine.record_group_push(named, version)

    def _form_group(self) -> None:
        """Ask every server to join while rank 0 forms the group, all of which block until the
        rendezvous completes; a server refusing is an error at once, not after the timeout."""
        self.broadcaster.listen()
        joins = [_ask(engine, engine.join_weight_group) for engine in self.engines]
        _wait_all([*joins, _in_background(self.broadcaster.connect)])

    def _send(self, named, version) -> None:
        buckets = list(bucketize(named, version, self.engines[0].bucket_bytes, checksums=False))
        for bucket in buckets:
            last = bucket is buckets[-1]
            requests = [_ask(engine, engine.receive_bucket, bucket, version, last) for engine in self.engines]
            try:
                self.broadcaster.broadcast(bucket.tensors)
            except Exception:
                _raise_failed(requests)  # a server's own error (say, it is gone) says more than rank 0's
                raise
            _wait_all(requests)


def _ask(engine: SGLangEngine, request, *args) -> Future:
    """`request(*args)`, one of `engine`'s, in the background; its failure names the server (a
    pool's share a name)."""
    def post() -> Any:
        try:
            return request(*args)
        except (httpx.HTTPError, ServerError) as err:
            raise ServerError(f"server at {engine.server.spec.url} ({type(err).__name__}): {err}") from err

    return _in_background(post)


def _in_background(function, *args, **kwargs) -> Future:
    """`function` in a daemon thread: a rendezvous or receive that never completes must hold up
    neither an error raised meanwhile nor the process's exit (a thread pool would do both)."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(function(*args, **kwargs))
        except BaseException as err:  # handed to whoever waits on the future
            future.set_exception(err)

    threading.Thread(target=run, name="sglang-weights", daemon=True).start()
    return future


def _wait_all(futures: list[Future]) -> None:
    """Until all are done; the first failure is raised as soon as it happens."""
    wait(futures, return_when=FIRST_EXCEPTION)
    _raise_failed(futures)


def _raise_failed(futures: list[Future]) -> None:
    """Raise the failure of the first that is done and failed, if any."""
    for future in futures:
        if future.done() and future.exception() is not None:
            raise future.exception()
