"""What every server-backed rollout engine shares: concurrent requests, retries, crash recovery.

A server engine launches one inference server (`rollout.server.ServerProcess`), fans generation
requests out concurrently (one per prompt, bounded by `max_concurrency`), and retries failed
requests with exponential backoff. Before each retry it checks the server: a dead or unhealthy
one is restarted and given the last pushed weights again (`_repush_weights`), so a crash costs
time but never silently serves stale or initial weights. Subclasses say how one prompt is asked
for (`_generate_one`) and how weights are re-pushed.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import httpx
import torch

from megatron_mgrpo.rollout.server import ServerError, ServerProcess
from megatron_mgrpo.rollout.types import Sample, SamplingParams

# weight files for a server on this host: in RAM, so writing and loading them is a memory copy
SHARED_MEMORY = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def save_safetensors(named_tensors: Iterable[tuple[str, torch.Tensor]], target: Path,
                     metadata: dict[str, str] | None = None) -> None:
    """Write HF-named tensors (and string `metadata`) to `target` as one safetensors file, atomically.

    Written under a temporary name and renamed, so a server (or a restart re-push) never reads
    a half-written file.
    """
    from safetensors.torch import save_file

    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in named_tensors}
    partial = target.with_name(target.name + ".partial")
    save_file(tensors, str(partial), metadata=metadata)
    partial.rename(target)


class HTTPServerEngine:
    """Base of the vLLM and SGLang engines; `kind` names the server in errors and `health()`."""

    kind = "server"
    in_process = False

    def __init__(self, server: ServerProcess, *, name: str, request_timeout_s: float, max_retries: int,
                 max_concurrency: int):
        if max_retries < 0 or max_concurrency < 1:
            raise ValueError(f"max_retries={max_retries} must be >= 0 and max_concurrency={max_concurrency} >= 1")
        self.server = server
        self.name = name
        self.request_timeout_s = request_timeout_s
        self.max_retries = max_retries
        self.max_concurrency = max_concurrency
        self.weights_version = 0
        self._recovering = threading.Lock()  # many failed requests, one restart

    @property
    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.server.spec.api_key}"} if self.server.spec.api_key else {}

    # ---------------------------------------------------------------------------------- sampling

    def generate(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingParams) -> list[Sample]:
        if n < 1:
            raise ValueError(f"n={n} samples per prompt must be >= 1")
        groups = asyncio.run(self._generate_all(prompts, n, sampling))
        return [sample for group in groups for sample in group]

    async def _generate_all(self, prompts, n, sampling) -> list[list[Sample]]:
        limit = asyncio.Semaphore(self.max_concurrency)
        async with httpx.AsyncClient(base_url=self.server.spec.url, headers=self._headers,
                                     timeout=self.request_timeout_s) as client:
            async def one(index: int) -> list[Sample]:
                async with limit:
                    return await self._generate_one(client, index, list(prompts[index]), n, sampling)
            return await asyncio.gather(*(one(i) for i in range(len(prompts))))

    async def _generate_one(self, client: httpx.AsyncClient, index: int, prompt: list[int], n: int,
                            sampling: SamplingParams) -> list[Sample]:
        """The n samples of one prompt, tagged with `prompt_index=index`."""
        raise NotImplementedError

    async def _post_with_recovery(self, client: httpx.AsyncClient, route: str, body: dict) -> Any:
        """POST with retries and backoff; a dead server is restarted (with its weights) first.

        A 4xx reply is our request's fault and is raised at once; 5xx and transport errors are
        the server's and are retried.
        """
        for attempt in range(self.max_retries + 1):
            try:
                response = await client.post(route, json=body)
                if response.status_code < 500:
                    response.raise_for_status()
                    return response.json()
                problem = f"HTTP {response.status_code}: {response.text[:300]}"
            except (httpx.TransportError, httpx.TimeoutException) as err:
                problem = f"{type(err).__name__}: {err}"
            if attempt == self.max_retries:
                break
            await asyncio.to_thread(self._recover_if_dead)
            await asyncio.sleep(min(2.0 ** attempt, 30.0))
        raise ServerError(f"{self.kind} {self.name} server failed {route} {self.max_retries + 1} times; last: "
                          f"{problem}; {self.server.log_excerpt()}")

    def _recover_if_dead(self) -> None:
        with self._recovering:  # requests that failed together find the server restarted by the first
            if self.server.is_alive() and self.server.healthy():
                return
            self.server.stop()
            self.server.start()
            self._repush_weights()

    def _repush_weights(self) -> None:
        """Give a freshly restarted server the last pushed weights (nothing if none were pushed)."""
        raise NotImplementedError

    # ---------------------------------------------------------------------------------- control

    def _post(self, route: str, body: dict | None = None, *, what: str) -> Any:
        """A blocking control request (weights, memory); failure names `what` was attempted."""
        reply = httpx.post(self.server.spec.url + route, headers=self._headers, json=body,
                           timeout=self.request_timeout_s)
        if reply.status_code != 200:
            raise ServerError(f"{self.kind} {self.name} refused {what} ({route}, HTTP {reply.status_code}): "
                              f"{reply.text[:500]}")
        return reply.json() if reply.content else None

    # ---------------------------------------------------------------------------------- lifecycle

    def health(self) -> dict[str, Any]:
        if not (self.server.is_alive() and self.server.healthy()):
            raise ServerError(f"{self.kind} {self.name} server at {self.server.spec.url} is not healthy; "
                              f"{self.server.log_excerpt()}")
        return {"engine": self.kind, "url": self.server.spec.url, "weights_version": self.weights_version}

    def shutdown(self) -> None:
        self.server.stop()
