"""The one typed config tree, loaded from YAML files plus dotted command-line overrides.

Defaults are the M-GRPO paper's recipe (Qwen3-4B-Base on MATH): G = 32 samples per prompt of
which N = G/4 = 8 come from the momentum model, temperature 1.1, AdamW lr 1e-6 with cosine
warm-up, KL 0.005 (k3 estimator), momentum m = 0.99, IQR k = 0.75.

Every leaf is declared with `option(...)`, whose help text, choices and bounds drive both the
validation here and the generated configuration reference, so the two cannot drift. OmegaConf
parses YAML and `a.b=value` overrides; the walk below turns the result into dataclasses and
reports the first problem with its dotted key, the value, what is allowed and a did-you-mean.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

#: allowed values that code outside this file checks too: declared once, here, where `mgrpo config
#: show` can read them without importing torch
ADVANTAGE_ESTIMATORS = ("grpo", "drgrpo", "rloo")
TIS_MODES = ("truncate", "mask")
LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")
KL_ESTIMATORS = ("k1", "k2", "k3")
LABEL_SOURCES = ("mgrpo", "srt", "ttrl", "gt", "intuitor")
VOTE_POOLS = ("pool", "momentum")
EXTRACTION_MODES = ("strict", "lenient")
DATA_FORMATS = ("auto", "jsonl", "parquet", "hf")
TEMPLATE_MODES = ("auto", "chat", "plain")


class ConfigError(ValueError):
    """A config key or value that cannot be used; the message says which, and what to do."""


def option(default: Any, help: str, *, choices: tuple | None = None, ge: float | None = None,
           gt: float | None = None, le: float | None = None, lt: float | None = None):
    """A config leaf: its default, a one-line help text, and what values are allowed."""
    meta = {"help": help, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt}
    return field(default=default, metadata=meta)


def section(cls: type, help: str):
    """A nested config section."""
    return field(default_factory=cls, metadata={"help": help})


@dataclass
class ModelConfig:
    path: str = option("builtin:tiny-qwen3",
                       "Hugging Face model directory, or `builtin:tiny-qwen3` for the embedded CPU model")
    dtype: str = option("auto", "parameter dtype; auto = bf16 on GPU, fp32 on CPU",
                        choices=("auto", "fp32", "bf16", "fp16"))
    fp8: str = option("off", "FP8 compute in the trainer (Transformer Engine, GPU only): e4m3 everywhere, or "
                             "hybrid (e4m3 forward, e5m2 gradients)", choices=("off", "e4m3", "hybrid"))
    fp8_recipe: str = option("delayed", "FP8 scaling recipe when model.fp8 is on: delayed (amax history), "
                                        "tensorwise (current per-tensor scales) or blockwise (block scales)",
                             choices=("delayed", "tensorwise", "blockwise"))
    fp8_params: bool = option(False, "keep the GEMM weights themselves in FP8 (needs model.fp8; saves memory)")


@dataclass
class ParallelConfig:
    tp: int = option(1, "tensor-parallel size", ge=1)
    pp: int = option(1, "pipeline-parallel size", ge=1)
    ep: int = option(1, "expert-parallel size (MoE models)", ge=1)
    cp: int = option(1, "context-parallel size", ge=1)


@dataclass
class RolloutConfig:
    engine: str = option("hf", "rollout engine: in-process transformers, or a vLLM / SGLang server",
                         choices=("hf", "vllm", "sglang"))
    weight_sync: str = option("auto", "how new weights reach SGLang servers started elsewhere (mgrpo launch): disk = "
                                      "a safetensors file per push (under the run directory for other hosts), "
                                      "distributed = an NCCL group of trainer rank 0 and each engine's GPUs, no "
                                      "files; auto = distributed when launch.placement=disaggregated and "
                                      "rollout.engine=sglang, else disk. vLLM, the in-process engine and SGLang "
                                      "servers the trainer starts itself ignore it",
                              choices=("auto", "disk", "distributed"))
    group_size: int = option(32, "G: samples per prompt (policy + momentum)", ge=2)
    momentum_samples: int = option(8, "N: samples drawn from the momentum model per prompt when "
                                      "reward.label_source=mgrpo (paper: G/4); other label sources "
                                      "draw all G from the policy", ge=1)
    temperature: float = option(1.1, "sampling temperature", gt=0.0)
    top_p: float = option(1.0, "nucleus sampling mass", gt=0.0, le=1.0)
    top_k: int = option(-1, "top-k sampling; -1 disables it", ge=-1)
    max_new_tokens: int = option(1024, "maximum response length in tokens", ge=1)
    momentum_sync_interval: int = option(1, "push the momentum weights to the momentum engines every "
                                            "this many optimizer steps", ge=1)
    max_staleness: int = option(0, "asynchronous rollout: the policy pool samples up to this many steps ahead "
                                   "of the trainer, with weights at most this many versions old (the scoring "
                                   "pass gives the old log-probs, TIS corrects engine vs trainer); 0 = "
                                   "synchronous", ge=0)
    momentum_max_staleness: int = option(0, "the same bound for the momentum pool, in steps past the momentum "
                                            "push the synchronous step would use (the momentum model moves "
                                            "slowly, so its samples can be made further ahead)", ge=0)
    filter_groups: bool = option(False, "dynamic sampling: train only on prompts whose kept responses' rewards "
                                        "differ (not unanimous, labelled, two or more kept by the IQR filter), "
                                        "drawing further prompts until train.prompts_per_step are informative")
    max_oversample: float = option(3.0, "dynamic sampling draws at most this many times train.prompts_per_step "
                                        "prompts in a step (then trains on fewer)", ge=1.0)


@dataclass
class AlgoConfig:
    advantage_estimator: str = option("grpo", "grpo: (r - mean) / std; drgrpo: r - mean; rloo: "
                                              "leave-one-out baseline", choices=ADVANTAGE_ESTIMATORS)
    iqr_filter: bool = option(True, "drop low-entropy trajectories with the IQR rule T = Q1 - k (Q3 - Q1)")
    iqr_k: float = option(0.75, "k of the IQR rule", ge=0.0)
    clip_low: float = option(0.2, "PPO clip: lower epsilon of the ratio", ge=0.0, lt=1.0)
    clip_high: float = option(0.28, "PPO clip: upper epsilon of the ratio", ge=0.0)
    tis_cap: float = option(2.0, "truncated importance sampling cap C on pi_train / pi_rollout", gt=0.0)
    tis_mode: str = option("truncate", "truncate: weight min(w, C); mask: tokens with w > C get no "
                                       "gradient", choices=TIS_MODES)
    loss_agg: str = option("token-mean", "how token losses are averaged",
                           choices=LOSS_AGGREGATIONS)
    kl_coef: float = option(0.005, "KL penalty coefficient; 0: no KL term (the reference forward then "
                                   "runs only for log.drift)", ge=0.0)
    kl_estimator: str = option("k3", "KL estimator: k1 (log ratio), k2 (squared), k3 (low variance)",
                               choices=KL_ESTIMATORS)
    kl_reference: str = option("initial", "KL anchor: the initial policy or the momentum model",
                               choices=("initial", "momentum"))
    momentum: float = option(0.99, "EMA coefficient m: theta_k <- m theta_k + (1 - m) theta_q; 1.0 freezes the "
                                   "momentum model at the starting weights (a fixed voter)", ge=0.0, le=1.0)
    momentum_schedule: str = option("constant", "m over training: constant, or cosine from algo.momentum at the "
                                                "first step to algo.momentum_final at the last (1 - m follows a "
                                                "half cosine, as in Co-rewarding-II)", choices=("constant", "cosine"))
    momentum_final: float = option(0.99999, "m at the last step when algo.momentum_schedule=cosine "
                                            "(Co-rewarding-II anneals 1 - m from 1e-2 to 1e-5)", ge=0.0, le=1.0)


@dataclass
class RewardConfig:
    label_source: str = option("mgrpo", "where labels come from: mgrpo (vote over policy + momentum), "
                                        "srt (vote over policy), ttrl (vote over a pool, train a subset), "
                                        "gt (gold answers), intuitor (self-certainty)",
                               choices=LABEL_SOURCES)
    vote_pool: str = option("pool", "label_source=mgrpo: whose answers vote; pool = the policy's M and the momentum "
                                    "model's N (the paper), momentum = the momentum model's N alone (the policy "
                                    "still trains on its own M)", choices=VOTE_POOLS)
    vote_threshold: float = option(0.0, "minimum vote share of the winning answer; below it the prompt "
                                        "gets no label and no gradient", ge=0.0, le=1.0)
    extraction: str = option("strict", "strict: last \\boxed{} only; lenient: also 'the answer is ...'",
                             choices=EXTRACTION_MODES)
    verify_timeout_s: float = option(5.0, "per-call timeout of answer equivalence checks", gt=0.0)
    verify_workers: int = option(1, "worker processes for answer equivalence (0: in-process, no "
                                    "timeout protection)", ge=0)
    ttrl_train_samples: int = option(16, "ttrl: how many of the G voting samples are trained on", ge=1)


@dataclass
class FieldsConfig:
    id: str = option("id", "column holding a stable prompt id (generated when absent)")
    question: str = option("question", "column holding the question text")
    answer: str = option("answer", "column holding the gold answer (monitoring, or label_source=gt)")
    solution: str = option("solution", "column holding a worked solution (gold is extracted from its "
                                        "last \\boxed{} when there is no answer column)")


@dataclass
class DataConfig:
    path: str = option("builtin:arithmetic", "jsonl / parquet file, HF datasets directory, or "
                                             "builtin:<task> (arithmetic, chain_sum, gsm, small_sums)")
    format: str = option("auto", "file format; auto decides from the suffix",
                         choices=DATA_FORMATS)
    fields: FieldsConfig = section(FieldsConfig, "column names")
    on_bad_row: str = option("skip", "skip (count and report) or error on malformed rows",
                             choices=("skip", "error"))
    template: str = option("auto", "prompt template: the tokenizer's chat template, a plain one, or "
                                   "auto (chat when the tokenizer has one)", choices=TEMPLATE_MODES)
    few_shot: int = option(0, "worked examples prepended to each prompt", ge=0)
    builtin_size: int = option(2000, "distinct RL questions drawn from builtin:<task> (its RL split, disjoint from "
                                     "the warm-start and eval splits by question text)", ge=1)
    seed: int = option(0, "seed for shuffling, few-shot choice and which questions of each builtin split are drawn "
                          "(never which split a question is in)")


@dataclass
class TrainConfig:
    steps: int = option(200, "optimizer steps to run", ge=1)
    prompts_per_step: int = option(8, "prompts per rollout batch", ge=1)
    updates_per_rollout: int = option(1, "optimizer steps per rollout batch (>1 makes PPO clip active)",
                                      ge=1)
    lr: float = option(1e-6, "peak learning rate (AdamW)", gt=0.0)
    min_lr: float = option(0.0, "final learning rate of the cosine decay", ge=0.0)
    lr_schedule: str = option("cosine", "learning-rate schedule after warm-up",
                              choices=("cosine", "constant"))
    lr_warmup_steps: int = option(10, "linear warm-up steps", ge=0)
    weight_decay: float = option(0.01, "AdamW weight decay", ge=0.0)
    grad_clip: float = option(1.0, "global gradient-norm clip; 0 disables it", ge=0.0)
    micro_batch_tokens: int = option(16384, "token budget of one forward/backward micro-batch", ge=1)
    prompt_sharing: str = option("auto", "one copy of a prompt per row for several of its responses (each attends "
                                         "to the prompt and itself): always needs megatron's local attention; auto "
                                         "shares unless Transformer Engine attention is in use",
                                 choices=("auto", "always", "never"))
    routing_replay: bool = option(False, "MoE: every trainer forward uses the experts the rollout engine chose "
                                         "for each token (needs rollout.engine hf or sglang, which report them)")
    seed: int = option(1234, "global random seed")


@dataclass
class WarmStartConfig:
    steps: int = option(0, "supervised steps on gold answers of warmstart.task's warm-start split before RL; "
                           "0 skips it. The result is cached by its settings and questions", ge=0)
    task: str = option("builtin:small_sums", "builtin:<task> the warm start learns from: only its warm-start split, "
                                             "which shares no question with the RL and eval splits")
    size: int = option(4000, "distinct questions of the warm-start split", ge=1)
    batch_size: int = option(64, "sequences per supervised step", ge=1)
    lr: float = option(3e-3, "peak learning rate of the supervised steps (constant after warm-up)", gt=0.0)


@dataclass
class EvalConfig:
    prompts: int = option(64, "evaluation prompts scored with gold answers for true accuracy (of the policy, and "
                              "of the momentum model when it samples); monitoring only, never a reward; 0 "
                              "disables it", ge=0)
    path: str = option("", "evaluation data: a jsonl / parquet file, datasets directory or builtin:<task> (its eval "
                           "split); empty = held out of data.path (a builtin task's eval split, or "
                           "eval.holdout_fraction of a file by question hash)")
    holdout_fraction: float = option(0.1, "share of a data.path file held out for evaluation (by question hash) when "
                                          "eval.path is empty", gt=0.0, lt=1.0)
    allow_overlap: bool = option(False, "accept eval.path data that shares questions with the RL data (test-time RL "
                                        "on purpose); the overlap is still counted in summary.json")
    interval: int = option(10, "measure true accuracy every this many steps (and at the start and end)", ge=1)
    temperature: float = option(0.0, "sampling temperature of the accuracy measurement; 0 is greedy", ge=0.0)
    samples: int = option(1, "samples per evaluation prompt; true accuracy is pass@1 averaged over them", ge=1)


@dataclass
class LogConfig:
    out_dir: str = option("runs", "parent directory of run directories")
    wandb: str = option("offline", "Weights & Biases mode (wandb's own mode names)",
                       choices=("disabled", "offline", "online"))
    wandb_project: str = option("megatron_mgrpo", "Weights & Biases project")
    interval: int = option(1, "log metrics every this many steps", ge=1)
    drift: bool = option(True, "with algo.kl_coef=0, still log kl/mean, the KL to the initial policy (the "
                               "collapse alarm's drift signal): keeps a frozen copy of the initial weights "
                               "and runs a no-grad forward of it per step; false skips both")
    anchor_interval: int = option(1, "label_source=mgrpo: measure the policy-momentum KL and weight distance every "
                                     "this many steps (a no-grad momentum forward over the policy's samples); 0 "
                                     "never", ge=0)
    tensorboard: bool = option(False, "also write the metrics.jsonl scalars as TensorBoard events, to tensorboard/ "
                                      "in the run directory, on rank 0 (needs the tensorboard package)")


@dataclass
class CheckpointConfig:
    interval: int = option(50, "save every this many steps", ge=1)
    keep_last: int = option(3, "complete checkpoints kept on disk", ge=1)
    resume: bool = option(True, "continue from the newest complete checkpoint of the run directory")


@dataclass
class LaunchConfig:
    """Cluster shape and rollout placement: read by `mgrpo launch`, which validates and starts a run."""

    nodes: int = option(1, "nodes of the job: training nodes plus, when disaggregated, rollout nodes", ge=1)
    gpus_per_node: int = option(8, "GPUs per node", ge=1)
    gpu_memory_gib: float = option(80.0, "memory of one GPU in GiB (H100 SXM: 80)", gt=0.0)
    placement: str = option("colocated", "colocated: rollout engines share the training GPUs; disaggregated: "
                                         "launch.rollout_nodes nodes run only rollout servers",
                            choices=("colocated", "disaggregated"))
    rollout_nodes: int = option(0, "disaggregated: nodes that run rollout servers (the others train)", ge=0)
    rollout_tp: int = option(1, "GPUs per rollout engine (its tensor-parallel size)", ge=1)
    policy_engines: int = option(6, "rollout engines serving the policy weights", ge=1)
    momentum_engines: int = option(2, "rollout engines serving the momentum (EMA) weights; 0 unless "
                                      "reward.label_source=mgrpo", ge=0)
    rollout_mem_fraction: float = option(0.4, "share of each rollout GPU's memory the engine reserves (SGLang "
                                              "--mem-fraction-static, vLLM --gpu-memory-utilization); "
                                              "colocated, the trainer gets the rest", gt=0.0, lt=1.0)
    max_prompt_tokens: int = option(1024, "longest prompt in tokens; with rollout.max_new_tokens it sets the "
                                          "engines' context length and the planner's sequence length", ge=1)
    activation_recompute: str = option("full", "activation recompute the memory plan assumes: full keeps only "
                                               "each layer's input, none keeps every activation",
                                       choices=("full", "none"))
    master_port: int = option(29500, "rendezvous port of the training processes", ge=1, le=65535)
    engine_port: int = option(30000, "port of the first rollout server on a node; the next ones count up",
                              ge=1, le=65535)
    engine_python: str = option("python3", "interpreter that runs the rollout servers: an environment with "
                                           "SGLang or vLLM, which pin their own torch")
    container_image: str = option("", "container image every srun step runs in (pyxis --container-image: a "
                                      "registry image such as nvcr.io#org/image:tag, or an enroot .sqsh file); "
                                      "empty runs on the host's software")
    container_mounts: str = option("", "with launch.container_image: host paths mounted into the container, "
                                       "SRC:DST[:ro] separated by commas (pyxis --container-mounts)")
    container_workdir: str = option("", "with launch.container_image: working directory inside the container, "
                                        "where the relative paths of the run resolve (pyxis --container-workdir); "
                                        "empty keeps the image's")


@dataclass
class Config:
    model: ModelConfig = section(ModelConfig, "the policy model")
    parallel: ParallelConfig = section(ParallelConfig, "megatron-core parallel layout")
    rollout: RolloutConfig = section(RolloutConfig, "sampling and rollout engines")
    algo: AlgoConfig = section(AlgoConfig, "advantages, filter, loss, KL and EMA")
    reward: RewardConfig = section(RewardConfig, "answer grading, voting and label sources")
    data: DataConfig = section(DataConfig, "prompt dataset and template")
    train: TrainConfig = section(TrainConfig, "optimisation")
    warmstart: WarmStartConfig = section(WarmStartConfig, "supervised warm start of a builtin model")
    eval: EvalConfig = section(EvalConfig, "true accuracy on the evaluation split during training")
    log: LogConfig = section(LogConfig, "metrics and tracking")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "distributed checkpoints")
    launch: LaunchConfig = section(LaunchConfig, "cluster shape and rollout placement (mgrpo launch)")

    def samples_per_prompt(self) -> tuple[int, int]:
        """(M, N): policy and momentum samples per prompt. Only mgrpo samples the momentum model."""
        g = self.rollout.group_size
        n = self.rollout.momentum_samples if self.reward.label_source == "mgrpo" else 0
        return g - n, n

    def kl_anchor(self) -> str | None:
        """Whose log-probs `kl/mean` compares the policy with: the frozen initial weights
        ("reference"), the momentum model, or nobody (no KL term and no drift logging)."""
        if self.algo.kl_coef > 0:
            return {"initial": "reference", "momentum": "momentum"}[self.algo.kl_reference]
        return "reference" if self.log.drift else None

    def sglang_weight_sync(self) -> str:
        """`rollout.weight_sync` with `auto` decided: "distributed" for SGLang servers on nodes of
        their own (launch.placement=disaggregated), where a file per push would cross the shared
        file system with the whole model every step; "disk" otherwise (shared memory on this host).
        A setting derived from the config alone, like `samples_per_prompt`: the trainer reads it
        to decide whether a pool's servers share a weight group, before any engine exists."""
        if self.rollout.weight_sync != "auto":
            return self.rollout.weight_sync
        disaggregated = self.rollout.engine == "sglang" and self.launch.placement == "disaggregated"
        return "distributed" if disaggregated else "disk"


# --------------------------------------------------------------------------------------------
# loading


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file at `path` (if any), then `key.sub=value` overrides."""
    layers = []
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config file {str(path)!r} is a directory: pass a YAML file to --config")
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist: pass an existing YAML file to --config")
        loaded = _load_yaml(path)
        if not isinstance(loaded, dict) and not OmegaConf.is_dict(loaded):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, not a list")
        layers.append((str(path), OmegaConf.to_container(loaded, resolve=True)))
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form key.sub=value (e.g. algo.momentum=0.99)")
        layers.append(("command line", OmegaConf.to_container(OmegaConf.from_dotlist([item]))))

    merged: dict = {}
    for origin, layer in layers:
        _merge(merged, layer or {}, origin)
    cfg = _build(Config, merged, prefix="")
    validate(cfg)
    return cfg


def _load_yaml(path: Path):
    """The parsed file; a YAML syntax error or a non-UTF-8 file becomes a one-line ConfigError saying where."""
    import yaml

    try:
        return OmegaConf.load(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        message = f"is not valid YAML{where}: {problem}; fix the syntax there"
    except UnicodeDecodeError as err:
        message = f"is not UTF-8 text (byte {err.start}): save it as UTF-8"
    raise ConfigError(f"config file {str(path)!r} {message}")  # outside `except`: no chained traceback


def _merge(into: dict, layer: dict, origin: str) -> None:
    for key, value in layer.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value, origin)
        else:
            into[key] = value


def _build(cls: type, values: Any, prefix: str):
    """Turn a nested dict into the dataclass `cls`, checking every key and type on the way."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"unknown config key {dotted!r}{_did_you_mean(prefix, key)}")
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            kwargs[key] = _build(kind, value, prefix=f"{dotted}.")
        else:
            kwargs[key] = _coerce(dotted, value, kind)
    return cls(**kwargs)


def _coerce(dotted: str, value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{dotted}={value!r} has the wrong type: expected {kind.__name__}")


def _leaf_paths(cls: type = Config, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(cls)
    paths = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            paths += _leaf_paths(hints[f.name], f"{prefix}{f.name}.")
        else:
            paths.append(f"{prefix}{f.name}")
    return paths


def _did_you_mean(prefix: str, key: str) -> str:
    siblings = sorted({p[len(prefix):].split(".")[0] for p in _leaf_paths() if p.startswith(prefix)})
    close = difflib.get_close_matches(key, siblings, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {prefix + close[0]!r}?"
    elsewhere = [p for p in _leaf_paths() if p.rsplit(".", 1)[-1] == key]
    if elsewhere:
        return f"; did you mean {elsewhere[0]!r}?"
    return f"; valid keys here: {', '.join(siblings)}"


# --------------------------------------------------------------------------------------------
# validation


def validate(cfg: Config) -> None:
    """Check every leaf against its declared bounds, then the rules that tie several keys."""
    _validate_leaves(cfg, "")
    m, n = cfg.samples_per_prompt()
    if cfg.reward.label_source == "mgrpo" and m < 2:
        raise ConfigError(
            f"rollout.momentum_samples={cfg.rollout.momentum_samples} leaves {m} policy sample(s) of "
            f"rollout.group_size={cfg.rollout.group_size}; the policy needs at least 2 for a group "
            f"advantage: lower rollout.momentum_samples (the paper uses group_size / 4)")
    if cfg.reward.label_source == "ttrl" and cfg.reward.ttrl_train_samples > cfg.rollout.group_size:
        raise ConfigError(
            f"reward.ttrl_train_samples={cfg.reward.ttrl_train_samples} exceeds rollout.group_size="
            f"{cfg.rollout.group_size}: ttrl trains on a subset of the voting pool; set it to at most "
            f"{cfg.rollout.group_size}")
    if cfg.train.min_lr > cfg.train.lr:
        raise ConfigError(f"train.min_lr={cfg.train.min_lr} is above train.lr={cfg.train.lr}: "
                          f"the schedule decays from lr to min_lr")
    if cfg.train.routing_replay and cfg.rollout.engine == "vllm":
        raise ConfigError("train.routing_replay=true needs the engine's expert choices, which rollout.engine=vllm "
                          "does not report: use rollout.engine=sglang (or hf), or train.routing_replay=false")
    if cfg.rollout.weight_sync == "distributed" and cfg.rollout.engine != "sglang":
        raise ConfigError(
            f"rollout.weight_sync=distributed sends weights through SGLang's weight-update group, which "
            f"rollout.engine={cfg.rollout.engine} does not have: use rollout.weight_sync=auto (or disk), or "
            f"rollout.engine=sglang")
    if cfg.rollout.weight_sync == "distributed" and cfg.launch.placement == "colocated":
        raise ConfigError(
            "rollout.weight_sync=distributed puts trainer rank 0 and the servers' GPUs in one NCCL group, which "
            "cannot hold two ranks on one GPU, as launch.placement=colocated would: set launch.placement="
            "disaggregated (servers on nodes of their own), or rollout.weight_sync=auto (disk when colocated)")
    if cfg.reward.vote_pool == "momentum" and cfg.reward.label_source != "mgrpo":
        raise ConfigError(f"reward.vote_pool=momentum votes with the momentum model's samples, which only "
                          f"reward.label_source=mgrpo draws (got {cfg.reward.label_source!r}): use vote_pool=pool")
    if cfg.rollout.momentum_max_staleness and cfg.reward.label_source != "mgrpo":
        raise ConfigError(f"rollout.momentum_max_staleness={cfg.rollout.momentum_max_staleness} bounds the momentum "
                          f"pool, which only reward.label_source=mgrpo samples from (got "
                          f"{cfg.reward.label_source!r}): set it to 0")
    if cfg.algo.kl_reference == "momentum" and cfg.reward.label_source != "mgrpo":
        raise ConfigError(
            f"algo.kl_reference=momentum needs the momentum model, which only "
            f"reward.label_source=mgrpo keeps (got {cfg.reward.label_source!r}): use kl_reference=initial")


def _validate_leaves(node: Any, prefix: str) -> None:
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        dotted = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _validate_leaves(value, f"{dotted}.")
            continue
        meta = f.metadata
        if meta.get("choices") and value not in meta["choices"]:
            raise ConfigError(f"{dotted}={value!r} is not allowed; choose one of: "
                              f"{', '.join(map(str, meta['choices']))}")
        checks = {"ge": value.__ge__, "gt": value.__gt__, "le": value.__le__, "lt": value.__lt__} \
            if isinstance(value, (int, float)) else {}
        if any(meta.get(key) is not None and not check(meta[key]) for key, check in checks.items()):
            raise ConfigError(f"{dotted}={value!r} is out of range: {describe_range(meta)}")


def describe_range(meta: typing.Mapping) -> str:
    """Human-readable allowed range of a leaf, e.g. 'must be >= 0 and <= 1'."""
    parts = [f"{sym} {meta[key]:g}" for key, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
             if meta.get(key) is not None]
    return "must be " + " and ".join(parts) if parts else "any value"


# --------------------------------------------------------------------------------------------
# output


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML, loadable again with `load_config`."""
    return OmegaConf.to_yaml(OmegaConf.create(dataclasses.asdict(cfg)))
