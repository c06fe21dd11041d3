"""HF <-> Megatron checkpoint conversion (`mgrpo convert`).

hf -> megatron: the HF directory is checked completely first (architecture and settings through
`model_spec_from_hf`, the layout, then every tensor name and shape in the safetensors headers
against the model that config.json describes, the tokenizer against the vocabulary, tied
embeddings), so a mismatch fails before anything is written. Then each rank of the requested
TP x PP x EP layout (tp * pp * ep processes; the EP ranks of a MoE model are its data-parallel
ranks, each holding num_experts / ep experts of every layer) builds its stage and fills it from
the safetensors files one layer at a time (peak memory: the stage plus one layer's full tensors),
and all ranks write a distributed checkpoint at step 0 (`train.checkpoint`), with the HF config
and tokenizer files in its `hf/`. The layout only decides which processes write which shards:
megatron-core stores every tensor by its global identity (an expert by its global index), so the
checkpoint loads under any TP / PP / EP layout.

megatron -> hf: one process loads the checkpoint at TP = PP = EP = 1 (dist_checkpointing reshards
whatever layout saved it), the policy weights or the momentum copy, exports them with the same
generator that feeds the rollout engines, and writes safetensors shards, the index, config.json
and the tokenizer files.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

#: The config fields that determine a tensor's shape, by the tensor's name (the first key it contains).
SHAPE_FIELDS = (("embed_tokens", "vocab_size, hidden_size"), ("lm_head", "vocab_size, hidden_size"),
                ("q_proj", "num_attention_heads, head_dim, hidden_size"),
                ("o_proj", "num_attention_heads, head_dim, hidden_size"),
                ("k_proj", "num_key_value_heads, head_dim, hidden_size"),
                ("v_proj", "num_key_value_heads, head_dim, hidden_size"),
                ("_norm", "head_dim / hidden_size"),
                ("experts.", "moe_intermediate_size (qwen3_moe) / intermediate_size (mixtral), hidden_size"),
                (".gate.", "num_local_experts / num_experts, hidden_size"),
                ("mlp.", "intermediate_size, hidden_size"),
                ("layernorm", "hidden_size"))
#: The config.json fields that hold the number of experts: transformers writes the first and reads
#: both (released Qwen3-MoE configs have the second).
EXPERTS_FIELDS = ("num_local_experts", "num_experts")


class ConversionError(ValueError):
    """A checkpoint or config that cannot be converted faithfully; says which field and why."""


class SafetensorsDir(Mapping):
    """The tensors of an HF directory by name, each read from its safetensors file when asked."""

    def __init__(self, hf_dir: str | os.PathLike):
        self.dir = Path(hf_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            self.files = {name: self.dir / file for name, file in json.loads(index.read_text())["weight_map"].items()}
        elif (self.dir / "model.safetensors").is_file():
            with _opened(self.dir / "model.safetensors") as f:
                self.files = {name: self.dir / "model.safetensors" for name in f.keys()}
        else:
            raise ConversionError(f"{self.dir} has neither model.safetensors nor model.safetensors.index.json "
                                  f"(only safetensors weights are converted)")

    def __getitem__(self, name: str):
        with _opened(self.files[name]) as f:
            return f.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, read from the file headers only."""
        shapes = {}
        for file in sorted(set(self.files.values())):
            with _opened(file) as f:
                shapes.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()})
        return shapes


@contextlib.contextmanager
def _opened(file: Path):
    """`safe_open(file)`, a truncated or corrupt file named in a ConversionError."""
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(file, "pt")
    except SafetensorError as err:
        raise ConversionError(f"{file} cannot be read ({err}): the file is truncated or corrupt; copy or download "
                              f"it again") from None
    with handle:
        yield handle


def check_hf_dir(hf_dir: str | os.PathLike, *, tp: int = 1, pp: int = 1, ep: int = 1):
    """The ModelSpec of a convertible HF directory, or a ConversionError naming what does not fit."""
    from megatron_mgrpo.models.hf_config import model_spec_from_hf, transformer_config

    hf_dir = Path(hf_dir)
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{config_path} does not exist: --hf must be a Hugging Face model directory")
    from huggingface_hub.errors import StrictDataclassError

    config = json.loads(config_path.read_text())
    try:
        spec = model_spec_from_hf(config, tp=tp)
        _check_ep(spec, ep, config, config_path)
        transformer_config(spec, tp=tp, pp=pp, ep=ep)
    except (ValueError, StrictDataclassError) as err:  # transformers' own validation raises the latter
        raise ConversionError(f"{config_path}: {err}") from err
    _check_tensors(SafetensorsDir(hf_dir), config, spec)
    _check_tokenizer(hf_dir, spec)
    return spec


def _check_ep(spec, ep: int, config: dict, config_path: Path) -> None:
    """EP splits the experts of every MoE layer evenly over `ep` ranks; a dense model has none to split.

    Checked here, with the CLI's option name, before `transformer_config` would name the training
    config's `parallel.ep`.
    """
    if ep > 1 and not spec.num_experts:
        raise ValueError(f"--ep {ep} splits the experts of a MoE model, and model_type={spec.model_type} in "
                         f"{config_path.name} is dense: use --ep 1")
    if spec.num_experts % ep:
        field = next((key for key in EXPERTS_FIELDS if key in config), EXPERTS_FIELDS[0])
        divisors = [str(n) for n in range(1, spec.num_experts + 1) if spec.num_experts % n == 0]
        raise ValueError(f"--ep {ep} must divide the number of experts, {field}={spec.num_experts} in "
                         f"{config_path.name}: use --ep {', '.join(divisors)}")


def _check_tensors(tensors: SafetensorsDir, config: dict, spec) -> None:
    """Names and shapes in the files against the HF model that config.json describes.

    MoE models keep their experts fused in memory (one `gate_up_proj` per layer) while checkpoints
    store one tensor per expert: the expected names are the model's split by `checkpoint_layout`.
    Checking every expert here matters most under EP, where each rank fills in only its own
    experts and a missing one would fail inside one spawned process rather than with this error.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_mgrpo.models.weight_map import checkpoint_layout

    found = tensors.shapes()
    if spec.tied_embeddings and "lm_head.weight" in found:  # a file may repeat the tied head, but equal
        if not torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"]):
            raise ConversionError("tie_word_embeddings=true in config.json, but lm_head.weight differs from "
                                  "model.embed_tokens.weight: set tie_word_embeddings=false")
        found.pop("lm_head.weight")
    with torch.device("meta"):
        reference = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    expected = {name: tuple(t.shape) for name, t in checkpoint_layout(reference.state_dict(), spec).items()}
    if spec.tied_embeddings:
        expected.pop("lm_head.weight", None)
    missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    if missing or unexpected:
        raise ConversionError(f"the safetensors files do not match config.json (num_hidden_layers="
                              f"{spec.num_layers}, tie_word_embeddings={spec.tied_embeddings}): missing "
                              f"{missing[:8]}{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                              f"{' ...' if len(unexpected) > 8 else ''}")
    for name, shape in expected.items():
        if found[name] != shape:
            fields = next((f for key, f in SHAPE_FIELDS if key in name), "the model dimensions")
            raise ConversionError(f"{name} has shape {list(found[name])} in the safetensors files, but config.json "
                                  f"implies {list(shape)}: check {fields} in config.json")


def _check_tokenizer(hf_dir: Path, spec) -> None:
    """A tokenizer with more tokens than the embedding has rows would index past the vocabulary."""
    if not any(hf_dir.glob("tokenizer*")):
        return
    from transformers import AutoTokenizer

    size = len(AutoTokenizer.from_pretrained(hf_dir))
    if size > spec.vocab_size:
        raise ConversionError(f"the tokenizer has {size} tokens but vocab_size={spec.vocab_size} in config.json: "
                              f"the embedding needs a row for every token")


def hf_to_megatron_dir(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, *, tp: int = 1, pp: int = 1,
                       ep: int = 1) -> Path:
    """Convert after `check_hf_dir` on tp * pp * ep ranks; returns the step-0 checkpoint directory
    under `out_dir`."""
    from megatron_mgrpo.train.checkpoint import checkpoint_dir, complete_checkpoints

    check_hf_dir(hf_dir, tp=tp, pp=pp, ep=ep)
    if complete_checkpoints(out_dir):
        raise ConversionError(f"{out_dir} already holds checkpoints: choose a new --out directory")
    _run_ranks(_convert_rank, tp * pp * ep, tp, pp, ep, str(hf_dir), str(out_dir))
    return checkpoint_dir(out_dir, 0)


def _run_ranks(fn, world: int, *args) -> None:
    """`fn(rank, world, port, *args)` on `world` gloo ranks: in this process when there is one."""
    from megatron_mgrpo.parallel.ports import free_port

    if world == 1:
        fn(0, 1, free_port(), *args)
        return
    import torch.multiprocessing as mp

    mp.start_processes(fn, args=(world, free_port(), *args), nprocs=world, start_method="spawn")


def _convert_rank(rank: int, world: int, port: int, tp: int, pp: int, ep: int, hf_dir: str, out_dir: str) -> None:
    from megatron.core import parallel_state as ps

    from megatron_mgrpo.models.hf_config import model_spec_from_hf
    from megatron_mgrpo.models.provider import build_gpt_model
    from megatron_mgrpo.parallel.dist import Launch, destroy_distributed, init_distributed
    from megatron_mgrpo.train.checkpoint import save_checkpoint

    init_distributed(tp=tp, pp=pp, ep=ep, launch=Launch(rank, world, rank, "127.0.0.1", port))
    try:
        spec = model_spec_from_hf(json.loads((Path(hf_dir) / "config.json").read_text()), tp=tp)
        stage = ps.get_pipeline_model_parallel_rank()
        model = build_gpt_model(spec, tp=tp, pp=pp, ep=ep, pre_process=stage == 0, post_process=stage == pp - 1)
        load_stage_layer_by_layer(model, SafetensorsDir(hf_dir), spec)
        save_checkpoint(out_dir, 0, model, keep_last=None, files_from=hf_dir,
                        common={"converted_from": str(Path(hf_dir).resolve())})
    finally:
        destroy_distributed()


def load_stage_layer_by_layer(model, tensors: Mapping, spec) -> None:
    """Fill this rank's stage from full HF tensors, reading one transformer layer at a time.

    `hf_to_megatron` cuts one pipeline stage; asked for "stage `layer` of `num_layers`" it cuts
    exactly one layer (plus the embedding with layer 0 and the final norm and head with the last
    one), so only that layer's tensors are read from `tensors`; of a MoE layer the map gives only
    this EP rank's experts. Every weight of the stage must be filled exactly once; names the stage
    lacks (the tied head's copy, which only a pipeline's last stage holds) are skipped.
    """
    import torch
    from megatron.core import parallel_state as ps

    from megatron_mgrpo.models.weight_map import TE_FUSED_NORMS, hf_to_megatron, stage_layers

    params = {name: t for name, t in model.state_dict().items() if not name.endswith("_extra_state")}
    fused_norms = any(name.endswith(te_name) for name in params for _, te_name in TE_FUSED_NORMS)
    layers = stage_layers(spec, ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size())
    filled = set()
    for local, layer in enumerate(layers):
        one = hf_to_megatron(tensors, spec, tp_rank=ps.get_tensor_model_parallel_rank(),
                             tp_size=ps.get_tensor_model_parallel_world_size(), pp_rank=layer,
                             pp_size=spec.num_layers, ep_rank=ps.get_expert_model_parallel_rank(),
                             ep_size=ps.get_expert_model_parallel_world_size(), fused_norms=fused_norms)
        for name, tensor in one.items():
            name = name.replace("decoder.layers.0.", f"decoder.layers.{local}.", 1)
            if name in params:
                with torch.no_grad():
                    params[name].copy_(tensor)
                filled.add(name)
    if filled != params.keys():
        raise ConversionError(f"the HF -> Megatron map left weights of this stage unfilled: "
                              f"{sorted(params.keys() - filled)}")


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A complete checkpoint directory, given it or a run directory (then its newest one)."""
    from megatron_mgrpo.train.checkpoint import COMPLETE_MARKER, latest_checkpoint

    path = Path(path)
    if (path / COMPLETE_MARKER).is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise ConversionError(f"{path} is neither a complete checkpoint nor a run directory with one")
    return latest


def megatron_to_hf_dir(ckpt: str | os.PathLike, out_dir: str | os.PathLike, *, momentum: bool = False,
                       max_shard_size: str = "5GB") -> Path:
    """Write an HF directory (weights in the config's dtype) from a checkpoint; returns `out_dir`."""
    from megatron_mgrpo.train.checkpoint import FILES_DIR, saved_common_state

    path = resolve_checkpoint(ckpt)
    if momentum and "momentum" not in (parts := saved_common_state(path)["parts"]):
        raise ConversionError(f"{path} holds no momentum copy (saved: model, {', '.join(parts) or 'nothing else'}): "
                              f"drop --momentum to export the policy")
    if not (path / FILES_DIR / "config.json").is_file():
        raise ConversionError(f"{path / FILES_DIR / 'config.json'} does not exist: this checkpoint was saved "
                              f"without the HF config (save_checkpoint(files_from=...)), so the model "
                              f"cannot be rebuilt")
    out_dir = Path(out_dir)
    if any(out_dir.glob("*.safetensors")):
        raise ConversionError(f"{out_dir} already holds safetensors files: choose an empty --out directory")
    _run_ranks(_export_rank, 1, str(path), str(out_dir), momentum, max_shard_size)
    return out_dir


def _export_rank(rank: int, world: int, port: int, path: str, out_dir: str, momentum: bool,
                 max_shard_size: str) -> None:
    import torch

    from megatron_mgrpo.models.hf_config import model_spec_from_hf
    from megatron_mgrpo.models.provider import build_gpt_model
    from megatron_mgrpo.parallel.dist import Launch, destroy_distributed, init_distributed
    from megatron_mgrpo.sync.export import export_hf_weights
    from megatron_mgrpo.train.checkpoint import FILES_DIR, copy_non_weight_files, load_checkpoint

    init_distributed(launch=Launch(rank, world, rank, "127.0.0.1", port))
    try:
        files = Path(path) / FILES_DIR
        config = json.loads((files / "config.json").read_text())
        spec = model_spec_from_hf(config)
        model = build_gpt_model(spec)
        if momentum:  # the EMA copy straight into the parameters: no second model in memory
            params = {name: p.detach() for name, p in model.named_parameters()}
            load_checkpoint(path, model, momentum=params, load_model=False, restore_rng=False)
        else:
            load_checkpoint(path, model, restore_rng=False)
        dtype = getattr(torch, config.get("dtype") or config.get("torch_dtype") or "float32")
        tensors = {name: t.to(dtype).contiguous() for name, t in export_hf_weights(model.state_dict(), spec)}
        write_safetensors_shards(tensors, Path(out_dir), max_shard_size)
        copy_non_weight_files(files, Path(out_dir))
    finally:
        destroy_distributed()


def write_safetensors_shards(tensors: dict, out_dir: Path, max_shard_size: str) -> None:
    """HF's file layout: shards named by huggingface_hub, plus the index when there are several."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({name: tensors[name] for name in names}, out_dir / filename, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
