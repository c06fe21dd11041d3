"""A `RolloutEngine` backed by a vLLM server that it launches and supervises, or one started
elsewhere (`url=`: the servers of a Slurm launch) that it only talks to.

Generation uses the OpenAI-compatible `/v1/completions` route with token-id prompts, one
request per prompt (n samples each), many in flight at once. Weight pushes go through
`megatron_mgrpo.rollout.vllm_worker.WeightSyncExtension` over the server's `/collective_rpc`:
the named tensors are written once as safetensors to `weights_dir` (shared memory by default;
for a server on another host, a file system both see), with the weights version and each
tensor's xxh3 checksum in the file's metadata, and every worker verifies them before vLLM's own
in-place reload: a damaged or truncated file fails the push, naming the tensor. The server may run
from another Python environment (vLLM pins its own torch and transformers): only `python` and the
path of this package are needed there.

Retries and crash recovery (restart, re-push the last weights, retry) come from
`rollout.http_engine.HTTPServerEngine`.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

import megatron_mgrpo
from megatron_mgrpo.parallel.ports import free_port
from megatron_mgrpo.rollout.http_engine import SHARED_MEMORY, HTTPServerEngine, save_safetensors
from megatron_mgrpo.rollout.server import RemoteServer, ServerProcess, ServerSpec
from megatron_mgrpo.rollout.types import Sample
from megatron_mgrpo.sync.buckets import tensor_checksums

PACKAGE_ROOT = str(Path(megatron_mgrpo.__file__).resolve().parents[1])
#: what every vLLM server we push weights to must be started with (also servers started by `mgrpo launch`)
WORKER_EXTENSION = "megatron_mgrpo.rollout.vllm_worker.WeightSyncExtension"
SERVER_ENV = {"VLLM_SERVER_DEV_MODE": "1"}  # exposes /collective_rpc for weight pushes


class VLLMEngine(HTTPServerEngine):
    """Launches `python -m vllm.entrypoints.openai.api_server` on one model and samples from it."""

    kind = "vllm"

    def __init__(self, model_path: str | Path, *, python: str = "python3", log_dir: str | Path = "logs",
                 name: str = "policy", dtype: str = "auto", max_model_len: int = 4096,
                 extra_args: Sequence[str] = (), env: dict[str, str] | None = None,
                 startup_timeout_s: float = 600.0, request_timeout_s: float = 600.0,
                 max_retries: int = 3, max_concurrency: int = 64, url: str | None = None,
                 api_key: str | None = None, weights_dir: str | Path = SHARED_MEMORY):
        self.model_path = str(model_path)
        self.weights_dir = Path(weights_dir)
        self._weights_file: Path | None = None
        if url:
            server = RemoteServer(url, api_key=api_key, startup_timeout_s=startup_timeout_s)
        else:
            port = free_port()
            api_key = secrets.token_hex(16)
            command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model_path,
                       "--served-model-name", name, "--host", "127.0.0.1", "--port", str(port),
                       "--api-key", api_key, "--dtype", dtype, "--max-model-len", str(max_model_len),
                       "--logprobs-mode", "processed_logprobs", "--worker-extension-cls", WORKER_EXTENSION,
                       *extra_args]
            server_env = {**SERVER_ENV,
                          "PYTHONPATH": os.pathsep.join(filter(None, [PACKAGE_ROOT, os.environ.get("PYTHONPATH")])),
                          **(env or {})}
            server = ServerProcess(ServerSpec(
                command=command, port=port, log_file=Path(log_dir) / f"vllm-{name}-{port}.log", api_key=api_key,
                env=server_env, startup_timeout_s=startup_timeout_s))
        super().__init__(server, name=name, request_timeout_s=request_timeout_s, max_retries=max_retries,
                         max_concurrency=max_concurrency)
        self.server.start()

    # ---------------------------------------------------------------------------------- sampling

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

    # ---------------------------------------------------------------------------------- weights

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        spec = self.server.spec
        self.weights_dir.mkdir(parents=True, exist_ok=True)
        target = self.weights_dir / f"mgrpo-vllm-{self.name}-{spec.host}-{spec.port}-v{version}.safetensors"
        named = [(name, tensor.detach().contiguous().cpu()) for name, tensor in named_tensors]
        checksums = dict(zip([name for name, _ in named], tensor_checksums([tensor for _, tensor in named])))
        save_safetensors(named, target, metadata={"mgrpo_weights_version": str(version),
                                                  "mgrpo_xxh3": json.dumps(checksums)})
        self._load_weights_file(target)
        if self._weights_file is not None and self._weights_file != target:
            self._weights_file.unlink(missing_ok=True)
        self._weights_file = target
        self.weights_version = version

    def _repush_weights(self) -> None:
        if self._weights_file is not None:
            self._load_weights_file(self._weights_file)

    def _load_weights_file(self, path: Path) -> None:
        self._post("/collective_rpc", {"method": "mgrpo_load_weights", "kwargs": {"path": str(path)}},
                   what=f"the weight update from {path}")
        self._post("/reset_prefix_cache", what="the prefix-cache reset after a weight update")

    # ---------------------------------------------------------------------------------- lifecycle

    def shutdown(self) -> None:
        super().shutdown()
        if self._weights_file is not None:
            self._weights_file.unlink(missing_ok=True)
            self._weights_file = None
