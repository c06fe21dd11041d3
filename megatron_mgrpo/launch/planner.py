"""Validate a run's layout and estimate its memory per GPU before any process starts.

A layout error found by megatron-core surfaces minutes into a 64-GPU job, and an out-of-memory
error even later (after the first rollout). Everything here is arithmetic on the config and the
model's config.json, so a dry run on a laptop says whether the job can start and, if not, which
constraint or which memory item fails first and which keys to change.

Memory assumptions (per training GPU, worst pipeline stage): bf16 weights, fp32 main gradients,
AdamW with fp32 master weights and moments sharded over data parallel (megatron's distributed
optimizer), the fp32 EMA momentum copy sharded like the weights (never over data parallel), a
bf16 reference copy when the KL anchor is the initial model, activations of the micro-batches in
flight, the fp32 logits of one micro-batch, and a fixed runtime overhead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_mgrpo.config import Config
from megatron_mgrpo.launch import LaunchError
from megatron_mgrpo.launch.model_shape import ModelShape
from megatron_mgrpo.models.hf_config import padded_vocab
from megatron_mgrpo.parallel.dist import data_parallel_size

GIB = 1024 ** 3
#: CUDA context, NCCL buffers and allocator fragmentation, per GPU.
RUNTIME_OVERHEAD_GIB = 3.0
#: bf16 weights, fp32 main grads, fp32 master + two fp32 Adam moments, fp32 EMA, bf16 reference.
WEIGHT_BYTES, GRAD_BYTES, OPTIMIZER_BYTES, EMA_BYTES, REFERENCE_BYTES = 2, 4, 12, 4, 2
#: bf16 logits plus the fp32 copy the log-prob and entropy kernels work on.
LOGIT_BYTES = 6


@dataclass(frozen=True)
class Layout:
    """Where the processes go and how the batch splits, once every constraint holds."""

    train_nodes: int
    rollout_nodes: int
    train_world: int
    dp: int
    expert_dp: int
    seq_len: int
    sequences_per_update: int
    micro_batches_per_rank: int


@dataclass(frozen=True)
class MemoryItem:
    name: str
    gib: float
    fix: str


@dataclass
class MemoryPlan:
    """What one GPU holds, in order of allocation, against what it has."""

    device: str
    budget_gib: float
    items: list[MemoryItem]

    @property
    def total_gib(self) -> float:
        return sum(item.gib for item in self.items)

    def first_overflow(self) -> MemoryItem | None:
        """The first item whose running total passes the budget: what to change first."""
        used = 0.0
        for item in self.items:
            used += item.gib
            if used > self.budget_gib:
                return item
        return None

    def overflow_message(self) -> str | None:
        item = self.first_overflow()
        if item is None:
            return None
        return (f"{self.device}: {item.name} ({item.gib:.1f} GiB) does not fit: the plan needs "
                f"{self.total_gib:.1f} GiB of {self.budget_gib:.1f} GiB; {item.fix}")


@dataclass
class Plan:
    layout: Layout
    train_memory: MemoryPlan
    rollout_memory: MemoryPlan | None
    kv_sequences: int | None
    warnings: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        plans = [self.train_memory] + ([self.rollout_memory] if self.rollout_memory else [])
        return [msg for msg in (p.overflow_message() for p in plans) if msg]


# --------------------------------------------------------------------------------------------
# layout


def check_layout(cfg: Config, shape: ModelShape) -> Layout:
    """Every constraint between the cluster, the parallel sizes, the model and the batch."""
    check_model_split(cfg, shape)
    train_nodes, rollout_nodes = _split_nodes(cfg)
    world = train_nodes * cfg.launch.gpus_per_node
    par = cfg.parallel
    try:
        dp = data_parallel_size(world, tp=par.tp, pp=par.pp, ep=par.ep, cp=par.cp)
    except ValueError as err:
        raise LaunchError(f"{err} (training GPUs = {train_nodes} node(s) x launch.gpus_per_node="
                          f"{cfg.launch.gpus_per_node})") from None
    _check_rollout_pools(cfg, shape, rollout_nodes)
    seq_len, per_update, micro = _check_batches(cfg, shape, dp)
    return Layout(train_nodes, rollout_nodes, world, dp, world // (par.tp * par.ep * par.pp), seq_len,
                  per_update, micro)


def check_model_split(cfg: Config, shape: ModelShape) -> None:
    par = cfg.parallel
    rules = [
        (shape.num_heads % par.tp, f"parallel.tp={par.tp} must divide the {shape.num_heads} attention heads"),
        (shape.num_kv_heads % par.tp, f"parallel.tp={par.tp} must divide the {shape.num_kv_heads} KV heads "
                                      f"(num_key_value_heads)"),
        (shape.num_layers % par.pp, f"parallel.pp={par.pp} must divide the {shape.num_layers} layers"),
        (par.ep > 1 and not shape.is_moe, f"parallel.ep={par.ep} needs a mixture-of-experts model; "
                                          f"{shape.model_type} has no experts: set parallel.ep=1"),
        (shape.is_moe and shape.num_experts % par.ep, f"parallel.ep={par.ep} must divide the "
                                                      f"{shape.num_experts} experts"),
        (cfg.train.routing_replay and not shape.is_moe, f"train.routing_replay=true needs a mixture-of-experts "
                                                        f"model; {shape.model_type} has no router: set it to false"),
    ]
    for failed, message in rules:
        if failed:
            raise LaunchError(message)


def _split_nodes(cfg: Config) -> tuple[int, int]:
    """(training nodes, rollout nodes) of the placement."""
    launch = cfg.launch
    if launch.placement == "colocated":
        if launch.rollout_nodes:
            raise LaunchError(f"launch.rollout_nodes={launch.rollout_nodes} with launch.placement=colocated: "
                              f"colocated engines share the training GPUs; set rollout_nodes=0 or "
                              f"placement=disaggregated")
        return launch.nodes, 0
    if cfg.rollout.engine == "hf":
        raise LaunchError("launch.placement=disaggregated needs server engines, but rollout.engine=hf runs "
                          "inside the trainer: set rollout.engine=sglang (or vllm)")
    if not 0 < launch.rollout_nodes < launch.nodes:
        raise LaunchError(f"launch.rollout_nodes={launch.rollout_nodes} of launch.nodes={launch.nodes}: "
                          f"disaggregated runs need at least one rollout node and one training node")
    return launch.nodes - launch.rollout_nodes, launch.rollout_nodes


def _check_rollout_pools(cfg: Config, shape: ModelShape, rollout_nodes: int) -> None:
    """Engines must tile their GPUs exactly, and the pools must be sized like the M:N split."""
    launch = cfg.launch
    if cfg.rollout.engine == "hf":
        return  # in-process engine: one per trainer, no pools to size
    if shape.num_heads % launch.rollout_tp or launch.gpus_per_node % launch.rollout_tp:
        raise LaunchError(f"launch.rollout_tp={launch.rollout_tp} must divide the {shape.num_heads} attention "
                          f"heads and launch.gpus_per_node={launch.gpus_per_node} (an engine stays on one node)")
    gpus = (rollout_nodes or launch.nodes) * launch.gpus_per_node
    engines = launch.policy_engines + launch.momentum_engines
    if engines * launch.rollout_tp != gpus:
        raise LaunchError(f"launch.policy_engines={launch.policy_engines} + launch.momentum_engines="
                          f"{launch.momentum_engines} engines x launch.rollout_tp={launch.rollout_tp} GPUs = "
                          f"{engines * launch.rollout_tp} GPUs, but the {launch.placement} rollout GPUs number "
                          f"{gpus}: make the engines tile them exactly")
    m, n = cfg.samples_per_prompt()
    want = 0 if n == 0 else min(engines - 1, max(1, round(engines * n / (m + n))))
    if launch.momentum_engines != want:
        raise LaunchError(f"launch.momentum_engines={launch.momentum_engines} does not match the M:N = {m}:{n} "
                          f"split of the samples over {engines} engines: use momentum_engines={want} and "
                          f"policy_engines={engines - want}")


def _check_batches(cfg: Config, shape: ModelShape, dp: int) -> tuple[int, int, int]:
    """(sequence length, sequences per optimizer step, micro-batches per data-parallel rank)."""
    seq_len = cfg.launch.max_prompt_tokens + cfg.rollout.max_new_tokens
    if seq_len > shape.max_position_embeddings:
        raise LaunchError(f"launch.max_prompt_tokens + rollout.max_new_tokens = {seq_len} exceeds the model's "
                          f"max_position_embeddings={shape.max_position_embeddings}: shorten one of them")
    if seq_len > cfg.train.micro_batch_tokens:
        raise LaunchError(f"one sequence of {seq_len} tokens (launch.max_prompt_tokens + rollout.max_new_tokens) "
                          f"does not fit train.micro_batch_tokens={cfg.train.micro_batch_tokens}: raise it to at "
                          f"least {seq_len}")
    m, _ = cfg.samples_per_prompt()
    sequences = cfg.train.prompts_per_step * m
    updates = cfg.train.updates_per_rollout
    if sequences % updates:
        raise LaunchError(f"train.prompts_per_step={cfg.train.prompts_per_step} x {m} policy samples = {sequences} "
                          f"sequences do not split into train.updates_per_rollout={updates} equal optimizer steps")
    per_update = sequences // updates
    if per_update % dp:
        raise LaunchError(f"{per_update} sequences per optimizer step do not split evenly over data-parallel size "
                          f"{dp}: change train.prompts_per_step, train.updates_per_rollout or the parallel sizes")
    per_micro = cfg.train.micro_batch_tokens // seq_len
    micro = -(-(per_update // dp) // per_micro)
    return seq_len, per_update, micro


# --------------------------------------------------------------------------------------------
# memory


def plan_launch(cfg: Config, shape: ModelShape) -> Plan:
    """Layout, memory per training GPU and per rollout GPU, and warnings that do not stop a run."""
    layout = check_layout(cfg, shape)
    warnings = []
    if cfg.parallel.pp > 1 and layout.micro_batches_per_rank < cfg.parallel.pp:
        warnings.append(f"{layout.micro_batches_per_rank} micro-batch(es) per rank for parallel.pp="
                        f"{cfg.parallel.pp} stages: the pipeline idles most of the step; lower "
                        f"train.micro_batch_tokens or parallel.pp")
    rollout, kv_sequences = None, None
    if cfg.rollout.engine != "hf":
        rollout, kv_sequences = _rollout_memory(cfg, shape, layout)
        per_engine = -(-cfg.train.prompts_per_step // cfg.launch.policy_engines) * cfg.samples_per_prompt()[0]
        if 0 < kv_sequences < per_engine:
            warnings.append(f"a policy engine's KV cache holds {kv_sequences} full-length sequences but gets "
                            f"{per_engine} per step: generation runs in waves; raise launch.rollout_mem_fraction "
                            f"or launch.rollout_tp")
    return Plan(layout, _training_memory(cfg, shape, layout), rollout, kv_sequences,
                warnings + _async_warnings(cfg, layout))


def _async_warnings(cfg: Config, layout: Layout) -> list[str]:
    """What asynchronous rollout (rollout.max_staleness / momentum_max_staleness) costs and gains here."""
    r = cfg.rollout
    ahead = max(r.max_staleness, r.momentum_max_staleness)
    if not ahead:
        return []
    # per in-flight batch on trainer rank 0: token ids (8 B) and engine log-probs (4 B) of every sample
    batch_bytes = cfg.train.prompts_per_step * r.group_size * layout.seq_len * 12
    warnings = [f"rollout runs up to {ahead} step(s) ahead: {ahead + 1} batches in flight hold "
                f"{(ahead + 1) * batch_bytes / 2**20:.0f} MiB of host memory on trainer rank 0"]
    if cfg.launch.placement == "colocated" or r.engine == "hf":
        warnings.append("the rollout engines share the trainer's devices (launch.placement=colocated or "
                        "rollout.engine=hf): generation and training take turns, so rollout.max_staleness buys "
                        "little; use launch.placement=disaggregated for the overlap")
    return warnings


def _local_params(cfg: Config, shape: ModelShape) -> tuple[float, float]:
    """(dense, expert) parameters on one GPU of the worst pipeline stage."""
    par = cfg.parallel
    layers = shape.num_layers // par.pp
    embeddings = 2 if par.pp == 1 and not shape.tied_embeddings else 1
    dense = (layers * shape.layer_dense_params() + embeddings * shape.embedding_params()) / par.tp
    experts = layers * shape.expert_params() / (par.ep * par.tp) if shape.is_moe else 0.0
    return dense, experts


def _training_memory(cfg: Config, shape: ModelShape, layout: Layout) -> MemoryPlan:
    dense, experts = _local_params(cfg, shape)
    local = dense + experts
    split = "raise parallel.tp or parallel.pp" + (" or parallel.ep" if shape.is_moe else "")
    items = [
        MemoryItem("weights (bf16)", local * WEIGHT_BYTES / GIB, split),
        MemoryItem("gradients (fp32)", local * GRAD_BYTES / GIB, split),
        MemoryItem("optimizer (fp32 master + Adam moments, sharded over data parallel)",
                   (dense / layout.dp + experts / layout.expert_dp) * OPTIMIZER_BYTES / GIB,
                   f"add nodes (more data-parallel shards) or {split}"),
        MemoryItem("momentum EMA (fp32)", local * EMA_BYTES / GIB,
                   f"{split}: the EMA is sharded like the weights, never over data parallel"),
    ]
    if cfg.kl_anchor() == "reference":
        items.append(MemoryItem("KL reference (bf16 initial weights)", local * REFERENCE_BYTES / GIB,
                                "set algo.kl_reference=momentum (the EMA is the anchor, no extra copy) or "
                                "algo.kl_coef=0 log.drift=false"))
    items += [
        MemoryItem("activations", _activation_bytes(cfg, shape) / GIB,
                   "lower train.micro_batch_tokens, set launch.activation_recompute=full or raise parallel.cp"),
        MemoryItem("logits of one micro-batch", cfg.train.micro_batch_tokens / cfg.parallel.cp
                   * padded_vocab(shape.vocab_size, cfg.parallel.tp) / cfg.parallel.tp * LOGIT_BYTES / GIB,
                   "lower train.micro_batch_tokens or raise parallel.tp"),
        MemoryItem("runtime overhead (CUDA context, NCCL, fragmentation)", RUNTIME_OVERHEAD_GIB,
                   "nothing to tune here: free memory elsewhere"),
    ]
    if cfg.launch.placement == "colocated" and cfg.rollout.engine != "hf":
        items.append(MemoryItem("rollout engine share", cfg.launch.rollout_mem_fraction * cfg.launch.gpu_memory_gib,
                                "lower launch.rollout_mem_fraction or use launch.placement=disaggregated"))
    return MemoryPlan("training GPU", cfg.launch.gpu_memory_gib, items)


def _activation_bytes(cfg: Config, shape: ModelShape) -> float:
    """Activations of the micro-batches in flight on the first pipeline stage (1F1B keeps up to pp).

    Per token and layer: bf16 norm inputs/outputs and residuals (4 x hidden), q / k / v and the
    attention output sharded over TP (flash attention keeps no scores), and the MLP's gate, up
    and SwiGLU outputs (for MoE: those of each routed copy plus the permuted tokens).
    """
    par = cfg.parallel
    h = shape.hidden_size
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    if shape.is_moe:
        mlp = 3 * shape.experts_per_token * shape.moe_ffn_hidden_size / par.tp + 2 * shape.experts_per_token * h
    else:
        mlp = 3 * shape.ffn_hidden_size / par.tp
    layer_bytes = 2 * (4 * h + (2 * q + 2 * kv) / par.tp + mlp)
    layers = shape.num_layers // par.pp
    kept = 2 * h * layers + layer_bytes if cfg.launch.activation_recompute == "full" else layer_bytes * layers
    tokens = cfg.train.micro_batch_tokens / par.cp
    return tokens * kept * par.pp


def _rollout_memory(cfg: Config, shape: ModelShape, layout: Layout) -> tuple[MemoryPlan, int]:
    """An engine's reserved share of one GPU: its weight shard, the rest is KV cache."""
    launch = cfg.launch
    budget = launch.rollout_mem_fraction * launch.gpu_memory_gib
    weights = shape.total_params() * WEIGHT_BYTES / launch.rollout_tp / GIB
    kv_per_token = shape.kv_bytes_per_token() / min(launch.rollout_tp, shape.num_kv_heads)
    kv_sequences = max(0, int((budget - weights) * GIB // (kv_per_token * layout.seq_len)))
    items = [MemoryItem("engine weights (bf16)", weights,
                        "raise launch.rollout_tp or launch.rollout_mem_fraction"),
             MemoryItem("KV cache for one full-length sequence", kv_per_token * layout.seq_len / GIB,
                        "raise launch.rollout_mem_fraction or launch.rollout_tp, or shorten rollout.max_new_tokens")]
    device = "rollout GPU (engine share)"
    return MemoryPlan(device, budget, items), kv_sequences
