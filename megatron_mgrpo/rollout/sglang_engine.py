"""A `RolloutEngine` backed by an SGLang server that it launches and supervises, or one started
elsewhere (`url=`: the servers of a Slurm launch) that it only talks to.

What the requests and replies hold (log-probs, routed experts, weight bodies) is
`rollout.sglang_protocol`; this module is the engine's state around them: which weights the
server holds, how they get there, its GPU memory and its restarts.

Weights (`weight_sync`):
- "disk": a safetensors file in a directory under `weights_dir` (shared memory by default; a file
  system the server also sees when it runs on another host), loaded by `/update_weights_from_disk`.
- "tensor" (colocated, same GPUs): per bucket, `/update_weights_from_tensor` with the bucket's
  `(name, tensor)` list pickled by torch's multiprocessing pickler (CUDA IPC handles, no copy),
  base64 for JSON, once per server TP rank. Before it the server's weights are resumed and after
  it the KV cache, if `release_memory()` freed them for training.
- "distributed" (separate GPUs): the servers of a pool share one weight group (`rank_offset`
  places each server's TP ranks in it), joined with `/init_weights_update_group` at the first
  push; then per bucket every server's `/update_weights_from_distributed` names the tensors
  while a `WeightBroadcaster` sends them once for all (`rollout.pool_push.DistributedPoolPush`,
  which drives each server through `join_weight_group`, `receive_bucket` and
  `record_group_push`). No file crosses a file system: what the trainer uses for servers on
  other nodes.
Every push also tags the server's `weight_version`. The last pushed weights are kept as a
safetensors file under `weights_dir`, so a restarted server is restored through the disk path
(then the pool forms a new weight group at the next distributed push). A server started
elsewhere that gets its weights through the group is the exception: see `_keeps_snapshot` and
`_confirm_weights_kept`.

Checked on CPU: every payload against SGLang 0.5.23's request types, the HTTP flow (retries,
restart, re-push) against a fake server, the weight-group protocol with gloo, and the distributed
push end to end with fake servers (one or several) joining a real gloo group. Still needs a GPU
with a real server: generation and its reply fields, log-prob parity with the trainer (also with
top-k / top-p through the sampling mask), the NCCL group join and broadcast update, the CUDA-IPC
tensor update, release / resume of memory, and routed-expert ids on an MoE model.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import httpx
import torch

from megatron_mgrpo.parallel.ports import free_port
from megatron_mgrpo.rollout.http_engine import SHARED_MEMORY, HTTPServerEngine, save_safetensors
from megatron_mgrpo.rollout.server import RemoteServer, ServerError, ServerProcess, ServerSpec
from megatron_mgrpo.rollout.sglang_protocol import (
    distributed_update_payload,
    generate_payload,
    init_group_payload,
    parse_generate_reply,
    tensor_update_payload,
)
from megatron_mgrpo.rollout.types import Sample
from megatron_mgrpo.rollout.weight_broadcast import WeightBroadcaster
from megatron_mgrpo.sync.buckets import DEFAULT_BUCKET_BYTES, Bucket, bucketize

WEIGHT_SYNC_MODES = ("disk", "tensor", "distributed")


class SGLangEngine(HTTPServerEngine):
    """Launches `python -m sglang.launch_server` on one model and samples from it."""

    kind = "sglang"

    def __init__(self, model_path: str | Path, *, python: str = "python3", log_dir: str | Path = "logs",
                 name: str = "policy", dtype: str = "auto", tp_size: int = 1, weight_sync: str = "disk",
                 broadcaster: WeightBroadcaster | None = None, rank_offset: int = 1, routed_experts: bool = False,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, extra_args: Sequence[str] = (),
                 env: dict[str, str] | None = None, startup_timeout_s: float = 900.0,
                 request_timeout_s: float = 600.0, max_retries: int = 3, max_concurrency: int = 64,
                 url: str | None = None, api_key: str | None = None, weights_dir: str | Path = SHARED_MEMORY):
        if weight_sync not in WEIGHT_SYNC_MODES:
            raise ValueError(f"weight_sync={weight_sync!r} must be one of {WEIGHT_SYNC_MODES}")
        if (weight_sync == "distributed") != (broadcaster is not None):
            raise ValueError("weight_sync='distributed' needs a WeightBroadcaster (the pool's weight group), "
                             "and only that mode takes one")
        if broadcaster is not None and not 1 <= rank_offset <= broadcaster.world_size - tp_size:
            raise ValueError(f"rank_offset={rank_offset} with tp_size={tp_size} does not fit in ranks "
                             f"1..{broadcaster.world_size - 1} of weight group {broadcaster.group_name!r}")
        self.model_path = str(model_path)
        self.tp_size = tp_size
        self.weight_sync = weight_sync
        self.broadcaster = broadcaster
        self.rank_offset = rank_offset
        self.bucket_bytes = bucket_bytes
        self.moe_shape = _moe_shape(self.model_path) if routed_experts else None
        self._released: set[str] = set()
        self._snapshot_dir: Path | None = None
        self._pushed = False
        self.weights_dir = Path(weights_dir)
        if url:
            server = RemoteServer(url, api_key=api_key, startup_timeout_s=startup_timeout_s)
        else:
            port = free_port()
            api_key = secrets.token_hex(16)
            command = [python, "-m", "sglang.launch_server", "--model-path", self.model_path, "--host", "127.0.0.1",
                       "--port", str(port), "--api-key", api_key, "--dtype", dtype, "--tp-size", str(tp_size),
                       "--skip-server-warmup", *(["--enable-memory-saver"] if weight_sync == "tensor" else []),
                       *(["--enable-return-routed-experts"] if routed_experts else []), *extra_args]
            server = ServerProcess(ServerSpec(command=command, port=port, api_key=api_key, env=dict(env or {}),
                                              log_file=Path(log_dir) / f"sglang-{name}-{port}.log",
                                              startup_timeout_s=startup_timeout_s))
        super().__init__(server, name=name, request_timeout_s=request_timeout_s, max_retries=max_retries,
                         max_concurrency=max_concurrency)
        self.server.start()

    # ---------------------------------------------------------------------------------- sampling

    async def _generate_one(self, client, index, prompt, n, sampling) -> list[Sample]:
        body = generate_payload(prompt, n, sampling, routed_experts=self.moe_shape is not None)
        reply = await self._post_with_recovery(client, "/generate", body)
        return parse_generate_reply(reply, index, prompt, sampling, self.weights_version, self.moe_shape)

    # ---------------------------------------------------------------------------------- weights

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Push to this server alone; in distributed mode only if it is alone in its weight group
        (else its `EnginePool` pushes to all the group's servers together: `pool_weight_push`)."""
        if self.weight_sync == "distributed":
            from megatron_mgrpo.rollout.pool_push import DistributedPoolPush  # which builds on this module

            DistributedPoolPush([self]).push(named_tensors, version)
            return
        named = list(named_tensors)
        snapshot = self._write_snapshot(named, version)
        if self.weight_sync == "disk":
            self._load_snapshot(snapshot, version)
        else:
            self.resume_memory(["weights"])
            self._push_buckets(named, version, "/update_weights_from_tensor",
                               lambda bucket, last: tensor_update_payload(bucket, self.tp_size, version, last))
            self.resume_memory(["kv_cache"])
        self._record_push(version)

    def _record_push(self, version: int) -> None:
        """Record a completed push: samples are tagged with it, a restart is checked against it."""
        self.weights_version = version
        self._pushed = True

    @property
    def _keeps_snapshot(self) -> bool:
        """Whether each push leaves a safetensors copy for a restarted server (`_repush_weights`).

        Not for a server started elsewhere that gets its weights through the group: it is never
        restarted from here (a launcher's dead server ends the run), it could not read a file in
        this host's memory, and a copy on the shared file system is what the group avoids."""
        return not (self.weight_sync == "distributed" and isinstance(self.server, RemoteServer))

    def _push_buckets(self, named, version, route, payload) -> None:
        buckets = list(bucketize(named, version, self.bucket_bytes, checksums=False))
        for bucket in buckets:
            self._post(route, payload(list(zip(bucket.names, bucket.tensors)), bucket is buckets[-1]),
                       what=f"weights version {version} bucket {bucket.index}")

    def _write_snapshot(self, named, version) -> Path:
        """The pushed weights as an HF safetensors directory: the disk push, and a restart's re-push."""
        spec = self.server.spec
        directory = self.weights_dir / f"mgrpo-sglang-{self.name}-{spec.host}-{spec.port}-v{version}"
        directory.mkdir(parents=True, exist_ok=True)
        save_safetensors(named, directory / "model.safetensors")
        if self._snapshot_dir is not None and self._snapshot_dir != directory:
            _remove_snapshot(self._snapshot_dir)
        self._snapshot_dir = directory
        return directory

    def _load_snapshot(self, directory: Path, version: int) -> None:
        self._post("/update_weights_from_disk", {"model_path": str(directory), "weight_version": str(version),
                                                 "flush_cache": True},
                   what=f"loading weights version {version} from {directory}")

    def _repush_weights(self) -> None:
        self._released.clear()
        if not self._keeps_snapshot:
            self._confirm_weights_kept()
            return
        if self.broadcaster is not None:  # the pool's group lost this server's ranks: the next push forms a new one
            self.broadcaster.close()
        if self._snapshot_dir is not None:
            self._load_snapshot(self._snapshot_dir, self.weights_version)

    def _confirm_weights_kept(self) -> None:
        """A server started elsewhere, synced through the group, answers again. If it reports the
        version last pushed it was only unreachable a while and kept its weights and its end of
        the group: nothing to do. If not, it was restarted, and there is nothing to restore it
        from (`_keeps_snapshot`): stop, rather than sample from weights nobody pushed."""
        if not self._pushed:
            return
        reply = httpx.get(self.server.spec.url + "/model_info", headers=self._headers, timeout=self.request_timeout_s)
        reply.raise_for_status()
        held = reply.json().get("weight_version")
        if held == str(self.weights_version):
            return
        self.broadcaster.close()  # its end is gone, so the pool's group is broken: a later push forms a new one
        raise ServerError(
            f"{self.kind} {self.name} server at {self.server.spec.url} is back with weights version {held!r} instead "
            f"of {self.weights_version}: it was restarted, and with weight_sync='distributed' a server started "
            f"elsewhere gets weights only through the weight group, of which no copy is kept to re-send. Stopping "
            f"rather than sampling from the wrong weights: resume the run from its last checkpoint (the same "
            f"command), or use rollout.weight_sync=disk")

    # ---------------------------------------------------------------------------------- weight group
    # What `DistributedPoolPush` asks of each server of a group. The requests block until rank 0
    # has done its part (formed the group, sent the bucket), so it makes them from other threads.

    def join_weight_group(self) -> None:
        """Ask the server to join its pool's weight group, its TP ranks from `rank_offset` on."""
        self._post("/init_weights_update_group", init_group_payload(self.broadcaster, self.rank_offset),
                   what=f"joining weight group {self.broadcaster.group_name!r}")

    def receive_bucket(self, bucket: Bucket, version: int, last: bool) -> None:
        """Name one bucket's tensors to the server, which takes them from rank 0's broadcast; the
        last bucket flushes the cache and sets the version."""
        body = distributed_update_payload(list(zip(bucket.names, bucket.tensors)), self.broadcaster.group_name,
                                          version, last)
        self._post("/update_weights_from_distributed", body, what=f"weights version {version} bucket {bucket.index}")

    def record_group_push(self, named: list[tuple[str, torch.Tensor]], version: int) -> None:
        """Take note of weights `version` that reached the server through the group: they are
        kept for a restart where a copy is kept (`_keeps_snapshot`), samples are tagged with the
        version and a restart is checked against it."""
        if self._keeps_snapshot:
            self._write_snapshot(named, version)
        self._record_push(version)

    # ---------------------------------------------------------------------------------- memory

    def release_memory(self) -> None:
        """Free the server's GPU weights and KV cache (colocated mode) while the trainer runs."""
        self._post("/release_memory_occupation", {"tags": ["weights", "kv_cache"]}, what="releasing GPU memory")
        self._released = {"weights", "kv_cache"}

    def resume_memory(self, tags: list[str]) -> None:
        """Re-allocate what `release_memory` freed: the weights before a push, the KV cache after it."""
        pending = [tag for tag in tags if tag in self._released]
        if pending:
            self._post("/resume_memory_occupation", {"tags": pending}, what=f"resuming GPU memory {pending}")
            self._released.difference_update(pending)

    def health(self) -> dict[str, Any]:
        return {**super().health(), "weight_sync": self.weight_sync, "memory_released": sorted(self._released)}

    def shutdown(self) -> None:
        super().shutdown()
        if self.broadcaster is not None:
            self.broadcaster.close()
        if self._snapshot_dir is not None:
            _remove_snapshot(self._snapshot_dir)
            self._snapshot_dir = None


def _moe_shape(model_path: str) -> tuple[int, int]:
    """(layers, experts per token) from the HF config: the layout of SGLang's routed-expert ids."""
    config = json.loads((Path(model_path) / "config.json").read_text())
    config = config.get("text_config", config)
    if "num_experts_per_tok" not in config:
        raise ValueError(f"routed_experts=True needs an MoE model, but {model_path}/config.json has no "
                         f"num_experts_per_tok; drop routed_experts for dense models")
    return int(config["num_hidden_layers"]), int(config["num_experts_per_tok"])


def _remove_snapshot(directory: Path) -> None:
    for path in directory.iterdir():
        path.unlink(missing_ok=True)
    directory.rmdir()
