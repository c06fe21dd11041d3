"""A `RolloutEngine` backed by a vLLM server that it launches and supervises.

Generation uses the OpenAI-compatible `/v1/completions` route with token-id prompts, one
request per prompt (n samples each), many in flight at once. Weight pushes go through
`megatron_mgrpo.rollout.vllm_worker.WeightSyncExtension` over the server's `/collective_rpc`:
the named tensors are written once to shared memory as safetensors and every worker loads them
with vLLM's own in-place reload. The server may run from another Python environment (vLLM pins
its own torch and transformers): only `python` and the path of this package are needed there.

A server that dies is detected on the next failed request, restarted, given the last pushed
weights again, and the request retried, so a crash costs time but never silently serves stale
or initial weights.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import httpx
import torch

import megatron_mgrpo
from megatron_mgrpo.rollout.server import ServerError, ServerProcess, ServerSpec, free_port
from megatron_mgrpo.rollout.types import Sample, SamplingParams

PACKAGE_ROOT = str(Path(megatron_mgrpo.__file__).resolve().parents[1])
SHARED_MEMORY = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


class VLLMEngine:
    """Launches `python -m vllm.entrypoints.openai.api_server` on one model and samples from it."""

    def __init__(self, model_path: str | Path, *, python: str = "python3", log_dir: str | Path = "logs",
                 name: str = "policy", dtype: str = "auto", max_model_len: int = 4096,
                 extra_args: Sequence[str] = (), env: dict[str, str] | None = None,
                 startup_timeout_s: float = 600.0, request_timeout_s: float = 600.0,
                 max_retries: int = 3, max_concurrency: int = 64):
        self.model_path = str(model_path)
        self.name = name
        self.request_timeout_s = request_timeout_s
        self.max_retries = max_retries
        self.max_concurrency = max_concurrency
        self.weights_version = 0
        self._weights_file: Path | None = None
        port = free_port()
        api_key = secrets.token_hex(16)
        command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model_path,
                   "--served-model-name", name, "--host", "127.0.0.1", "--port", str(port),
                   "--api-key", api_key, "--dtype", dtype, "--max-model-len", str(max_model_len),
                   "--logprobs-mode", "processed_logprobs",
                   "--worker-extension-cls", "megatron_mgrpo.rollout.vllm_worker.WeightSyncExtension",
                   *extra_args]
        server_env = {"VLLM_SERVER_DEV_MODE": "1",  # exposes /collective_rpc for weight pushes
                      "PYTHONPATH": os.pathsep.join(filter(None, [PACKAGE_ROOT, os.environ.get("PYTHONPATH")])),
                      **(env or {})}
        self.server = ServerProcess(ServerSpec(
            command=command, port=port, log_file=Path(log_dir) / f"vllm-{name}-{port}.log", api_key=api_key,
            env=server_env, startup_timeout_s=startup_timeout_s))
        self.server.start()

    @property
    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.server.spec.api_key}"}

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

    async def _generate_one(self, client, index, prompt, n, sampling) -> list[Sample]:
        body = {"model": self.name, "prompt": prompt, "n": n, "temperature": sampling.temperature,
                "top_p": sampling.top_p, "top_k": sampling.top_k, "max_tokens": sampling.max_new_tokens,
                "logprobs": 0, "return_token_ids": True, "stop": list(sampling.stop),
                "include_stop_str_in_output": True, "skip_special_tokens": True}
        if sampling.seed is not None:
            body["seed"] = sampling.seed + index
        reply = await self._post_with_recovery(client, "/v1/completions", body)
        version = self.weights_version
        return [Sample(prompt_index=index, prompt_ids=prompt, response_ids=list(choice["token_ids"]),
                       text=choice["text"], logprobs=[float(lp) for lp in choice["logprobs"]["token_logprobs"]],
                       finish_reason=choice["finish_reason"] or "length", weights_version=version)
                for choice in sorted(reply["choices"], key=lambda c: c["index"])]

    async def _post_with_recovery(self, client: httpx.AsyncClient, route: str, body: dict) -> dict:
        """POST with retries and backoff; a dead server is restarted (with its weights) first."""
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
        raise ServerError(f"vLLM {self.name} server failed {route} {self.max_retries + 1} times; last: {problem}; "
                          f"log {self.server.spec.log_file}:\n{self.server.log_tail()}")

    def _recover_if_dead(self) -> None:
        if self.server.is_alive() and self.server.healthy():
            return
        self.server.stop()
        self.server.start()
        if self._weights_file is not None:
            self._load_weights_file(self._weights_file)

    # ---------------------------------------------------------------------------------- weights

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        from safetensors.torch import save_file

        tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in named_tensors}
        target = Path(SHARED_MEMORY) / f"mgrpo-{self.name}-{self.server.spec.port}-v{version}.safetensors"
        partial = target.with_suffix(".partial")
        save_file(tensors, str(partial))
        partial.rename(target)
        self._load_weights_file(target)
        if self._weights_file is not None and self._weights_file != target:
            self._weights_file.unlink(missing_ok=True)
        self._weights_file = target
        self.weights_version = version

    def _load_weights_file(self, path: Path) -> None:
        reply = httpx.post(self.server.spec.url + "/collective_rpc", headers=self._headers,
                           timeout=self.request_timeout_s,
                           json={"method": "mgrpo_load_weights", "kwargs": {"path": str(path)}})
        if reply.status_code != 200:
            raise ServerError(f"vLLM {self.name} rejected the weight update from {path} "
                              f"(HTTP {reply.status_code}): {reply.text[:500]}")
        httpx.post(self.server.spec.url + "/reset_prefix_cache", headers=self._headers, timeout=60).raise_for_status()

    # ---------------------------------------------------------------------------------- lifecycle

    def health(self) -> dict[str, Any]:
        if not (self.server.is_alive() and self.server.healthy()):
            raise ServerError(f"vLLM {self.name} server at {self.server.spec.url} is not healthy; "
                              f"log {self.server.spec.log_file}:\n{self.server.log_tail()}")
        return {"engine": "vllm", "url": self.server.spec.url, "weights_version": self.weights_version}

    def shutdown(self) -> None:
        self.server.stop()
        if self._weights_file is not None:
            self._weights_file.unlink(missing_ok=True)
            self._weights_file = None
