"""The Megatron policy: scoring and training sequences through megatron-core's schedules.

One object per rank holds its pipeline stage of the GPTModel (in Megatron DDP), the distributed
optimizer and LR schedule, and the shadow weights (momentum EMA, frozen initial reference).
Everything goes through `get_forward_backward_func()`, so the same code runs one process on a
laptop and TP x PP x DP on a cluster:

- `score` runs a forward-only pass and returns per-token log-probs and entropies of the
  response tokens of every sequence, on every rank (the IQR filter, the KL anchor and the
  train/rollout mismatch all need them before the loss is built);
- `train_step` runs forward-backward over micro-batches with an objective from `algo/`, then one
  optimizer step, and returns the loss and optimizer metrics on every rank.

Sequences are split over data-parallel ranks; results are exchanged as small per-token lists,
never as logits (the vocabulary stays split over TP ranks throughout).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from megatron_mgrpo.algo import momentum_at
from megatron_mgrpo.config import Config
from megatron_mgrpo.models.hf_config import ModelSpec
from megatron_mgrpo.models.rows import RowHooks
from megatron_mgrpo.parallel.collectives import broadcast_from_last_stage, gather_from_data_parallel_ranks
from megatron_mgrpo.sync.export import export_hf_weights
from megatron_mgrpo.train.batching import (
    MicroBatch,
    TrainSequences,
    attention_pair_cost,
    collate,
    data_parallel_share,
    micro_batches,
    pack_by_tokens,
    row_width,
    share_prompt_rows,
)
from megatron_mgrpo.train.logprobs import vocab_parallel_logprobs_and_entropy, vocab_parallel_self_certainty
from megatron_mgrpo.train.momentum import ShadowWeights
from megatron_mgrpo.train.optimizer import build_optimizer, wrap_ddp
from megatron_mgrpo.train.routing_replay import RoutingReplay

#: objective(micro_batch, logp [b, S-1]) -> (loss averaged over its units, number of units, stats)
Objective = Callable[[MicroBatch, torch.Tensor], tuple[torch.Tensor, int, dict[str, float]]]

PARAMS_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def params_dtype(name: str) -> torch.dtype:
    """model.dtype -> torch dtype; auto is bf16 on GPU and fp32 on CPU (CPU bf16 matmuls are slow)."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return PARAMS_DTYPES[name]


@dataclass
class Scores:
    """Per sequence, over its response tokens: log-probs and entropies (lists of 1-d tensors), and
    when asked for, Intuitor's self-certainty (its mean over the response tokens)."""

    logprobs: list[torch.Tensor]
    entropy: list[torch.Tensor]
    self_certainty: list[float] | None = None


class MegatronPolicy:
    """This rank's share of the policy model, its optimizer and its shadow weights."""

    def __init__(self, spec: ModelSpec, hf_state: dict[str, torch.Tensor], cfg: Config, *,
                 momentum: bool = True, reference: bool = False, pad_id: int = 0):
        from megatron.core import parallel_state as ps

        from megatron_mgrpo.models.hf_config import fp8_settings
        from megatron_mgrpo.models.provider import build_gpt_model, load_hf_weights

        self.spec, self.cfg, self.pad_id = spec, cfg, pad_id
        self.dtype = params_dtype(cfg.model.dtype)
        model = cfg.model
        module = build_gpt_model(spec, tp=cfg.parallel.tp, pp=cfg.parallel.pp, ep=cfg.parallel.ep,
                                 params_dtype=self.dtype,
                                 fp8=fp8_settings(model.fp8, model.fp8_recipe, model.fp8_params),
                                 pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
                                 routing_replay=cfg.train.routing_replay)
        load_hf_weights(module, hf_state, spec)
        self.replay = RoutingReplay(module) if cfg.train.routing_replay else None
        self.pair_cost = prompt_sharing(cfg.train.prompt_sharing, spec)
        self.rows = RowHooks(module)
        self.module = module  # unwrapped: its state_dict names are the weight maps' names
        self.model = wrap_ddp(module)
        self.optimizer, self.scheduler = build_optimizer([self.model], cfg.train, self.dtype)
        self.momentum = ShadowWeights(module) if momentum else None
        self.reference = ShadowWeights(module) if reference else None
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.steps = 0

    # ---------------------------------------------------------------- forward passes

    def _run(self, batches: list[MicroBatch], loss_func: Callable, forward_only: bool) -> list:
        """megatron's schedule over `batches`; returns what `loss_func` returned per micro-batch
        (on the last pipeline stage; an empty list elsewhere)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        device = next(self.module.parameters()).device

        def forward_step(data_iterator, model):
            batch = next(data_iterator).to(device)
            if self.replay is not None:  # the engine's experts for this micro-batch's forward
                self.replay.replay(batch.routing)
            self.rows.set(batch.position_ids, batch.source)
            output = model(batch.input_ids, batch.position_ids, attention_mask=batch.attention_mask)
            return output, partial(loss_func, batch)

        if not batches:  # this data-parallel rank has nothing to do; it still joins the gradient reduction
            return []
        if self.replay is not None and any(batch.routing is None for batch in batches):
            raise ValueError("train.routing_replay=true, but these sequences carry no routed experts: "
                             "the rollout engine must report them (Sample.routed_experts)")
        try:
            return get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter(batches), model=[self.model],
                num_microbatches=len(batches), seq_length=batches[0].input_ids.shape[1],
                micro_batch_size=batches[0].input_ids.shape[0], forward_only=forward_only,
                collect_non_loss_data=forward_only)
        finally:
            self.rows.clear()
            if self.replay is not None:
                self.replay.clear()

    def _my_share(self, sequences: TrainSequences) -> tuple[list[int], list[MicroBatch]]:
        """This data-parallel rank's sequence indices and their micro-batches.

        With experts split over ranks (EP > 1) every MoE layer's forward exchanges tokens with the
        other expert-parallel ranks, which are other data-parallel ranks: they must run the same
        number of micro-batches, and (CPU's allgather dispatcher) of the same shape. Then the
        data-parallel ranks agree on the largest plan and pad to it, a rank with fewer sequences
        running all-padding micro-batches (no response tokens: nothing reaches the loss)."""
        from megatron.core import parallel_state as ps

        share = data_parallel_share(len(sequences), self.dp_rank, self.dp_size)
        mine, budget = sequences.subset(share), self.cfg.train.micro_batch_tokens
        if ps.get_expert_model_parallel_world_size() == 1:
            return share, micro_batches(mine, budget, self.pad_id, self.pair_cost)
        rows = share_prompt_rows(mine, budget, self.pair_cost)
        widths = [row_width(mine, row) for row in rows]
        groups = pack_by_tokens(widths, budget)
        routing_shape = (self.spec.num_layers, self.spec.moe_topk) if self.replay is not None else None
        shapes = [(len(group), max(widths[i] for i in group)) for group in groups]
        plans = gather_from_data_parallel_ranks(shapes)
        plan = [tuple(max(p[i][d] for p in plans if i < len(p)) for d in (0, 1))
                for i in range(max(map(len, plans)))]
        return share, [collate(mine, [rows[r] for r in groups[i]] if i < len(groups) else [], self.pad_id,
                               num_rows=num_rows, width=width, routing_shape=routing_shape)
                       for i, (num_rows, width) in enumerate(plan)]

    def _response_logits(self, batch: MicroBatch, logits: torch.Tensor) -> torch.Tensor:
        """[n, R, V_local]: the logits that predict each response token (the model computed only
        those: `RowHooks`)."""
        return logits.view(*batch.source.shape, logits.shape[-1])

    def _logprobs(self, batch: MicroBatch, logits: torch.Tensor, temperature: float):
        return vocab_parallel_logprobs_and_entropy(self._response_logits(batch, logits), batch.targets,
                                                   self.spec.vocab_size, temperature)

    @torch.no_grad()
    def score(self, sequences: TrainSequences, temperature: float = 1.0, weights: str = "policy",
              self_certainty: bool = False) -> Scores:
        """Response-token log-probs and entropies of all `sequences` under `weights` (policy,
        momentum or reference), and optionally their self-certainty, returned on every rank."""
        def per_sequence(batch: MicroBatch, logits: torch.Tensor, non_loss_data: bool = True):
            mask = batch.response_mask
            certainty = [float("nan")] * len(batch.indices)
            if self_certainty:  # before the log-probs, which consume the logits
                per_token = vocab_parallel_self_certainty(self._response_logits(batch, logits), self.spec.vocab_size)
                certainty = [float(per_token[row][mask[row]].sum() / max(int(mask[row].sum()), 1))
                             for row in range(len(batch.indices))]
            logprobs, entropy = self._logprobs(batch, logits, temperature)
            return [(index, (logprobs[row][mask[row]].cpu(), entropy[row][mask[row]].cpu(), certainty[row]))
                    for row, index in enumerate(batch.indices)]

        share, batches = self._my_share(sequences)
        self.model.eval()
        with self._weights(weights):
            results = [item for out in self._run(batches, per_sequence, forward_only=True) for item in out]
        self.model.train()
        mine = {share[index]: scored for index, scored in results}
        parts = gather_from_data_parallel_ranks(broadcast_from_last_stage(mine))
        everything = {k: v for part in parts for k, v in part.items()}
        ordered = [everything[i] for i in range(len(sequences))]
        return Scores([lp for lp, _, _ in ordered], [h for _, h, _ in ordered],
                      [c for _, _, c in ordered] if self_certainty else None)

    def _shadow(self, which: str) -> ShadowWeights:
        shadow = {"momentum": self.momentum, "reference": self.reference}.get(which)
        if shadow is None:
            raise ValueError(f"no {which!r} weights on this policy: choose policy, momentum or reference, "
                             f"and build the policy with that shadow enabled")
        return shadow

    @contextlib.contextmanager
    def _weights(self, which: str) -> Iterator[None]:
        if which == "policy":
            yield
            return
        with self._shadow(which).swapped_in():
            yield

    # ---------------------------------------------------------------- training

    def train_step(self, sequences: TrainSequences, objective: Objective, temperature: float = 1.0) -> dict[str, float]:
        """Forward-backward of `objective` over all `sequences` (split over DP ranks), then one
        optimizer step. Returns loss, the objective's stats (unit-weighted), entropy (over the
        sequences, of their mean token entropy before the step), grad_norm and lr."""
        def loss_func(batch: MicroBatch, logits: torch.Tensor):
            logprobs, entropy = self._logprobs(batch, logits, temperature)
            loss, units, stats = objective(batch, logprobs)
            units = torch.tensor(units, dtype=torch.int)
            tokens = batch.response_mask.sum(-1)
            per_sequence = torch.where(batch.response_mask, entropy, 0).sum(-1) / tokens.clamp(min=1)
            return loss * units, units, {"loss": loss.detach() * units, "units": units,
                                         "entropy_sum": per_sequence.sum(), "sequences": (tokens > 0).sum(), **{
                name: torch.as_tensor(value, dtype=torch.float32) * units for name, value in stats.items()}}

        share, batches = self._my_share(sequences)
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = self._run(batches, loss_func, forward_only=False)
        if not batches:  # the schedule did not run: join its gradient reductions with zero gradients
            self.model.config.finalize_model_grads_func([self.model], torch.zeros([], dtype=torch.int))
        self.scheduler.step(increment=1)  # step k trains with the learning rate of step k (k >= 1)
        _, grad_norm, _ = self.optimizer.step()
        self.steps += 1
        totals = {}
        for out in outputs:
            for name, value in out.items():
                totals[name] = totals.get(name, 0.0) + float(value)
        # objects, not one tensor: a rank without sequences has no stat names
        parts = gather_from_data_parallel_ranks(broadcast_from_last_stage(totals))
        totals = {name: sum(part.get(name, 0.0) for part in parts) for name in set().union(*parts)}
        units = max(totals.pop("units", 0.0), 1.0)
        entropy = totals.pop("entropy_sum", math.nan) / max(totals.pop("sequences", 0.0), 1.0)
        metrics = {name: value / units for name, value in totals.items()}
        return metrics | {"entropy": entropy, "grad_norm": float(grad_norm or 0.0),
                          "lr": self.optimizer.param_groups[0]["lr"]}

    def update_momentum(self) -> float:
        """The EMA step after an optimizer step: local shards only, no communication. Returns the m
        used (algo.momentum_schedule; the step count is the scheduler's, so a resumed run continues
        the schedule)."""
        algo, train = self.cfg.algo, self.cfg.train
        m = momentum_at(self.scheduler.num_steps, train.steps * train.updates_per_rollout, algo.momentum,
                        algo.momentum_final, algo.momentum_schedule)
        if self.momentum is not None:
            self.momentum.ema_update_(m)
        return m

    @torch.no_grad()
    def weight_distance(self, which: str, other: str = "policy") -> float:
        """||theta_which - theta_other|| (L2) over the whole model, on every rank: each local shard
        counted once (tensor-parallel duplicates on TP rank 0 only), summed over the ranks that hold
        different shards."""
        from megatron.core import parallel_state as ps

        params = [param for _, param in self.module.named_parameters()]  # the shadows' order

        def tensors(name: str) -> list[torch.Tensor]:
            return [p.detach() for p in params] if name == "policy" else self._shadow(name).tensors

        dense, expert = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        for param, a, b in zip(params, tensors(which), tensors(other)):
            expert_param = not getattr(param, "allreduce", True)
            tp_rank = ps.get_expert_tensor_parallel_rank() if expert_param else ps.get_tensor_model_parallel_rank()
            if getattr(param, "tensor_model_parallel", False) or tp_rank == 0:
                square = (a.double() - b.double()).square().sum().cpu()
                if expert_param:
                    expert += square
                else:
                    dense += square
        if dist.get_world_size() > 1:
            dist.all_reduce(dense, group=ps.get_model_parallel_group())
            dist.all_reduce(expert, group=ps.get_expert_tensor_model_pipeline_parallel_group())
        return float((dense + expert).sqrt())

    def hf_weights(self, which: str = "policy") -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, full tensor) of the policy or momentum weights, all yielded on global rank 0
        (every rank must walk the iterator: it gathers over TP, EP and pipeline stages)."""
        local = self.module.state_dict() if which == "policy" else self._shadow(which).state_dict()
        return export_hf_weights(local, self.spec, collect_stages=True)


def prompt_sharing(mode: str, spec: ModelSpec) -> float | None:
    """train.prompt_sharing -> the attention pair cost that `share_prompt_rows` weighs rows by, or
    None (no sharing). A shared row needs an arbitrary attention mask, which megatron's local
    attention applies; Transformer Engine's attention, as megatron builds it, is causal only."""
    from megatron_mgrpo.config import ConfigError
    from megatron_mgrpo.models.hf_config import transformer_engine_available

    if mode == "never" or (mode == "auto" and transformer_engine_available()):
        return None
    if transformer_engine_available():
        raise ConfigError("train.prompt_sharing=always needs megatron's local attention (a per-row attention "
                          "mask), but Transformer Engine layers are in use, whose attention is causal only: "
                          "set train.prompt_sharing=auto or never")
    mlp = spec.moe_topk * spec.moe_ffn_hidden_size if spec.num_experts else spec.ffn_hidden_size
    return attention_pair_cost(spec.hidden_size, spec.num_heads, spec.head_dim, spec.num_query_groups, mlp)
