"""SGLang's HTTP protocol as pure functions: the request bodies our engine sends and the
`Sample`s read from its replies. No engine state lives here, so every body can be checked
against SGLang's own request types without a server (tests/unit/rollout/sglang_schema.py).

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

Weights: the bodies of `/update_weights_from_tensor` (CUDA IPC handles), of
`/init_weights_update_group` and of `/update_weights_from_distributed` (a weight group's
broadcast, see `rollout.pool_push`). Every push's last request tags the server's `weight_version`.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from megatron_mgrpo.rollout.server import ServerError
from megatron_mgrpo.rollout.types import Sample, SamplingParams

if TYPE_CHECKING:
    from megatron_mgrpo.rollout.weight_broadcast import WeightBroadcaster


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
    """Whether top-k / top-p cut the distribution, so that SGLang's plain log-probs (taken before
    truncation) are not those of the sampling and the renormalised ones are asked for."""
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
