"""Routing replay for MoE models: make the trainer use the experts the rollout engine used.

A token's experts come from a top-k over router scores, so the tiny numerical differences
between an inference engine and the trainer flip some choices, and the trainer's log-probs then
belong to another network than the one that sampled. Replaying the engine's choices
(`Sample.routed_experts`, one [tokens, topk] tensor of expert ids per layer) removes that: the
router still computes its probabilities (and gets gradients through them) for the imposed
experts.

This wraps megatron-core's `RouterReplay` (0.16.1; the model is built with
`build_gpt_model(..., routing_replay=True)`). megatron keeps every router's replay object in one
process-wide list and addresses layers by position in it; this class instead holds the objects of
one model (or pipeline stage), keyed by global layer index, so a second model or a stage with
fewer layers cannot shift the layers, and `release` removes them from the global list.

Token order is megatron's: sequence-major ([seq, batch] flattened), the order of the hidden
states the router sees; `batch_routing` lays out a batch of samples' routing that way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch


def batch_routing(routed: Sequence[Sequence[Any]], seq_len: int, topk: int, *, rows: int | None = None,
                  layers: int | None = None) -> list[torch.Tensor]:
    """Per layer, the [seq_len x rows, topk] expert ids of a right-padded batch in megatron's token
    order, from each sample's per-layer [tokens, topk] ids (`Sample.routed_experts`, tokens from
    the start of the sequence). Padding positions, and padding rows beyond the samples (`rows`,
    default one per sample), get experts 0..topk-1: with no expert capacity they change no other
    token, and the loss masks them. `layers` is needed only when there are no samples."""
    rows = len(routed) if rows is None else rows
    if layers is None:
        if not routed:
            raise ValueError("batch_routing needs at least one sample's routed experts, or `layers`")
        layers = len(routed[0])
    if any(len(sample) != layers for sample in routed):
        raise ValueError(f"samples report routing for {[len(s) for s in routed]} layers; the model has {layers}")
    if rows < len(routed):
        raise ValueError(f"rows={rows} leaves no room for {len(routed)} samples")
    out = []
    for layer in range(layers):
        grid = torch.arange(topk).expand(seq_len, rows, topk).clone()
        for b, sample in enumerate(routed):
            ids = torch.as_tensor(sample[layer], dtype=torch.int64)
            if ids.dim() != 2 or ids.shape[0] > seq_len or ids.shape[1] != topk:
                raise ValueError(f"sample {b}, layer {layer}: routed experts of shape {tuple(ids.shape)} do not fit "
                                 f"[<= {seq_len} tokens, topk={topk}]")
            grid[:ids.shape[0], b] = ids
        out.append(grid.reshape(-1, topk))
    return out


class RoutingReplay:
    """Record and replay the expert choices of one model's MoE layers."""

    def __init__(self, model: torch.nn.Module):
        from megatron.core.transformer.moe.router import TopKRouter

        routers = [m for m in model.modules() if isinstance(m, TopKRouter)]
        if not routers:
            raise ValueError("the model has no MoE routers: routing replay needs a MoE model")
        if any(r.router_replay is None for r in routers):
            raise ValueError("the model was built without routing replay: build it with "
                             "build_gpt_model(..., routing_replay=True)")
        #: global layer index (0-based) -> that layer's megatron RouterReplay
        self.layers = {r.layer_number - 1: r.router_replay for r in routers}

    def record(self) -> None:
        """From the next forward on, keep each layer's chosen experts (read them with `recorded`)."""
        self._set_action("RECORD")

    def recorded(self) -> dict[int, torch.Tensor]:
        """Global layer index -> [tokens, topk] expert ids of the last recorded forward."""
        out = {layer: replay.get_recorded_indices() for layer, replay in self.layers.items()}
        missing = sorted(layer for layer, ids in out.items() if ids is None)
        if missing:
            raise RuntimeError(f"no routing recorded for layers {missing}: call record() before the forward")
        return out

    def replay(self, routed: Sequence[torch.Tensor] | Mapping[int, torch.Tensor]) -> None:
        """Impose `routed[layer]` ([tokens, topk] expert ids, all layers of the model or only this
        stage's) on the next forwards, and queue it for recomputation in the backward pass."""
        table = dict(routed) if isinstance(routed, Mapping) else dict(enumerate(routed))
        missing = sorted(set(self.layers) - set(table))
        if missing:
            raise ValueError(f"routed experts for layers {missing} are missing (got layers {sorted(table)})")
        for layer, replay in self.layers.items():
            ids = torch.as_tensor(table[layer], dtype=torch.int64)
            if ids.dim() != 2:
                raise ValueError(f"routed experts of layer {layer} have shape {tuple(ids.shape)}; "
                                 f"expected [tokens, topk]")
            replay.set_target_indices(ids)
        self._set_action("REPLAY_FORWARD")

    def replay_backward(self) -> None:
        """Switch to the backward phase: layers recomputed during backward (activation
        recompute) take the queued expert ids in order instead of choosing again."""
        self._set_action("REPLAY_BACKWARD")

    def clear(self) -> None:
        """Forget recorded and queued expert ids and return to normal routing."""
        for replay in self.layers.values():
            replay.clear_indices()
            replay.clear_router_replay_action()

    def release(self) -> None:
        """`clear`, then drop this model's replay objects from megatron's global list."""
        from megatron.core.transformer.moe.router_replay import RouterReplay

        self.clear()
        mine = {id(replay) for replay in self.layers.values()}
        RouterReplay.global_router_replay_instances[:] = [
            r for r in RouterReplay.global_router_replay_instances if id(r) not in mine]

    @contextlib.contextmanager
    def replaying(self, routed: Sequence[torch.Tensor] | Mapping[int, torch.Tensor]) -> Iterator[None]:
        """`replay(routed)` for the forward and backward inside the block (call `replay_backward`
        between them when activations are recomputed); cleared afterwards, also on errors."""
        self.replay(routed)
        try:
            yield
        finally:
            self.clear()

    def _set_action(self, name: str) -> None:
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        for replay in self.layers.values():
            replay.set_router_replay_action(RouterReplayAction[name])
