"""A `RolloutEngine` backed by an SGLang server that it launches and supervises, or one started
elsewhere (`url=`: the servers of a Slurm launch) that it only talks to.

Generation: one native `/generate` request per prompt with `input_ids` and `n` in the sampling
parameters (SGLang fans n out into parallel samples and answers with a list).

Log-probs (read from SGLang 0.5.23's sampler): with `return_logprob`, `output_token_logprobs`
holds log softmax(logits / temperature) of each sampled token (unless the server runs with
`SGLANG_RETURN_ORIGINAL_LOGPROB=1`, which drops the temperature: never set it), i.e. before
top-k / top-p truncation. That equals our `Sample` contract when top-k and top-p are off (the
M-GRPO recipe). With truncation on, the request also sets `return_sampling_mask` with
`sampling_logprobs_mode="selected"`, and `output_token_sampling_logprobs` (renormalised over the
sampled support) is used instead. `logprob_start_len=-1` keeps prompt log-probs out of the reply.

Routing replay (MoE): with `return_routed_experts`, `meta_info["routed_experts"]` is base64 of
int32 expert ids shaped [tokens, layers, top_k], for every position but the last
(`routed_experts_start_len=0`: the prompt too, as the trainer's forward needs); it becomes
`Sample.routed_experts`, one [tokens, top_k] tensor per layer.

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
  while a `WeightBroadcaster` sends them once for all (`DistributedPoolPush`). No file crosses a
  file system: what the trainer uses for servers on other nodes.
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

import base64
import io
import json
import secrets
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import torch

from megatron_mgrpo.rollout.http_engine import SHARED_MEMORY, HTTPServerEngine, save_safetensors
from megatron_mgrpo.rollout.server import RemoteServer, ServerError, ServerProcess, ServerSpec
from megatron_mgrpo.parallel.ports import free_port
from megatron_mgrpo.rollout.types import Sample, SamplingParams
from megatron_mgrpo.rollout.weight_broadcast import WeightBroadcaster
from megatron_mgrpo.sync.buckets import DEFAULT_BUCKET_BYTES, bucketize

if TYPE_CHECKING:
    from megatron_mgrpo.config import Config

WEIGHT_SYNC_MODES = ("disk", "tensor", "distributed")


def weight_sync_mode(cfg: Config) -> str:
    """`rollout.weight_sync` with `auto` decided: "distributed" for SGLang servers on nodes of
    their own (launch.placement=disaggregated), where a file per push would cross the shared file
    system with the whole model every step; "disk" otherwise (shared memory on this host)."""
    if cfg.rollout.weight_sync != "auto":
        return cfg.rollout.weight_sync
    disaggregated = cfg.rollout.engine == "sglang" and cfg.launch.placement == "disaggregated"
    return "distributed" if disaggregated else "disk"


def generate_payload(prompt: Sequence[int], n: int, sampling: SamplingParams, *,
                     routed_experts: bool = False) -> dict[str, Any]:
    """The `/generate` body for n samples of one token-id prompt."""
    params = {"n": n, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
              "max_new_tokens": sampling.max_new_tokens, "stop": list(sampling.stop), "no_stop_trim": True,
              "skip_special_tokens": True}
    if sampling.seed is not None:
        params["sampling_seed"] = sampling.seed
    body = {"input_ids": list(prompt), "sampling_params": params, "return_logprob": True, "logprob_start_len": -1}
    if _truncates(sampling):
        body.update(return_sampling_mask=True, sampling_logprobs_mode="selected")
    if routed_experts:
        body.update(return_routed_experts=True, routed_experts_start_len=0)
    return body


def _truncates(sampling: SamplingParams) -> bool:
    return sampling.top_k > 0 or sampling.top_p < 1.0


def parse_generate_reply(reply: dict | list, index: int, prompt: list[int], sampling: SamplingParams,
                         version: int, moe_shape: tuple[int, int] | None = None) -> list[Sample]:
    """`Sample`s from a `/generate` reply (a dict for one sample, a list for n > 1)."""
    outputs = reply if isinstance(reply, list) else [reply]
    return [_sample(out, index, prompt, sampling, version, moe_shape) for out in outputs]


def _sample(out: dict, index, prompt, sampling, version, moe_shape) -> Sample:
    meta = out["meta_info"]
    response = list(out["output_ids"])
    if _truncates(sampling):
        logprobs = [float(lp) for lp in meta["output_token_sampling_logprobs"]]
    else:
        logprobs = [float(entry[0]) for entry in meta["output_token_logprobs"]]
    if len(logprobs) != len(response):
        raise ServerError(f"SGLang returned {len(logprobs)} log-probs for {len(response)} tokens of prompt {index}; "
                          f"was the server started with SGLANG_RETURN_ORIGINAL_LOGPROB or a logprob limit?")
    reason = meta.get("finish_reason") or {}
    return Sample(prompt_index=index, prompt_ids=prompt, response_ids=response, text=out.get("text", ""),
                  logprobs=logprobs, finish_reason="length" if reason.get("type") == "length" else "stop",
                  weights_version=version,
                  routed_experts=_routed_experts(meta, moe_shape) if moe_shape else None)


def _routed_experts(meta: dict, moe_shape: tuple[int, int]) -> list[torch.Tensor]:
    """Per layer [tokens, top_k] int32 expert ids from SGLang's base64 [tokens, layers, top_k]."""
    layers, top_k = moe_shape
    raw = bytearray(base64.b64decode(meta["routed_experts"]))
    ids = torch.frombuffer(raw, dtype=torch.int32).reshape(-1, layers, top_k)
    return list(ids.permute(1, 0, 2).contiguous().unbind(0))


def tensor_update_payload(named_tensors: list[tuple[str, torch.Tensor]], tp_size: int, version: int,
                          last: bool) -> dict[str, Any]:
    """The `/update_weights_from_tensor` body for one bucket.

    SGLang unpickles one entry per TP rank with torch's multiprocessing pickler, which turns CUDA
    tensors into IPC handles: the GPU memory is shared, not copied, and must stay alive until
    the request returns. The cache is flushed and the version set with the last bucket only.
    """
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401  (registers torch's tensor reductions with ForkingPickler)

    buffer = io.BytesIO()
    ForkingPickler(buffer).dump([(name, tensor.detach().contiguous()) for name, tensor in named_tensors])
    serialized = base64.b64encode(buffer.getvalue()).decode("ascii")
    return {"serialized_named_tensors": [serialized] * tp_size, "flush_cache": last,
            **({"weight_version": str(version)} if last else {})}


def distributed_update_payload(named_tensors: list[tuple[str, torch.Tensor]], group_name: str, version: int,
                               last: bool) -> dict[str, Any]:
    """The `/update_weights_from_distributed` body naming one bucket's broadcasts, in order."""
    return {"names": [name for name, _ in named_tensors],
            "dtypes": [str(tensor.dtype).removeprefix("torch.") for _, tensor in named_tensors],
            "shapes": [list(tensor.shape) for _, tensor in named_tensors], "group_name": group_name,
            "flush_cache": last, **({"weight_version": str(version)} if last else {})}


def init_group_payload(broadcaster: WeightBroadcaster, rank_offset: int = 1) -> dict[str, Any]:
    """The `/init_weights_update_group` body: the server's ranks start at `rank_offset`."""
    return {"master_address": broadcaster.master_address, "master_port": broadcaster.master_port,
            "rank_offset": rank_offset, "world_size": broadcaster.world_size,
            "group_name": broadcaster.group_name, "backend": broadcaster.backend}


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
        (else its `EnginePool` pushes to all the group's servers together)."""
        if self.weight_sync == "distributed":
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
            if engine._keeps_snapshot:
                engine._write_snapshot(named, version)
            engine._record_push(version)

    def _form_group(self) -> None:
        """Ask every server to join while rank 0 forms the group, all of which block until the
        rendezvous completes; a server refusing is an error at once, not after the timeout."""
        self.broadcaster.listen()
        joins = [self._ask(engine, "/init_weights_update_group",
                           init_group_payload(self.broadcaster, engine.rank_offset),
                           f"joining weight group {self.broadcaster.group_name!r}") for engine in self.engines]
        _wait_all([*joins, _in_background(self.broadcaster.connect)])

    def _send(self, named, version) -> None:
        buckets = list(bucketize(named, version, self.engines[0].bucket_bytes, checksums=False))
        for bucket in buckets:
            body = distributed_update_payload(list(zip(bucket.names, bucket.tensors)), self.broadcaster.group_name,
                                              version, bucket is buckets[-1])
            requests = [self._ask(engine, "/update_weights_from_distributed", body,
                                  f"weights version {version} bucket {bucket.index}") for engine in self.engines]
            try:
                self.broadcaster.broadcast(bucket.tensors)
            except Exception:
                _raise_failed(requests)  # a server's own error (say, it is gone) says more than rank 0's
                raise
            _wait_all(requests)

    @staticmethod
    def _ask(engine: SGLangEngine, route: str, body: dict, what: str) -> Future:
        """The request in the background; its failure names the server (a pool's share a name)."""
        def post() -> Any:
            try:
                return engine._post(route, body, what=what)
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
