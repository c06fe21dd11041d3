"""The sizes of a model, read from its Hugging Face config.json, for layout checks and memory plans.

The planner must size a 30B MoE on a laptop before any weight exists, so it reads the raw
config.json (no transformers import) and counts parameters from the architecture numbers alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from megatron_mgrpo.launch import LaunchError

#: Published config.json files of the recipes' models, named after the last component of their hub name.
MODEL_CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "model_configs"


class ModelConfigError(LaunchError):
    """A model config.json that cannot be found or read; the message says which file and what to do."""


@dataclass(frozen=True)
class ModelShape:
    """Architecture numbers of a dense or MoE decoder (Llama / Qwen2 / Qwen3 / Qwen3-MoE families)."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    tied_embeddings: bool
    num_experts: int = 0
    experts_per_token: int = 0
    moe_ffn_hidden_size: int = 0

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def attention_params(self) -> int:
        """q, k, v and output projections plus the two per-layer norms and Qwen3's q/k norms."""
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        return self.hidden_size * (q + 2 * kv) + q * self.hidden_size + 2 * self.hidden_size + 2 * self.head_dim

    def dense_mlp_params(self) -> int:
        return 3 * self.hidden_size * self.ffn_hidden_size  # SwiGLU: gate, up, down

    def expert_params(self) -> int:
        """All routed experts of one layer (the router is counted with the dense weights)."""
        return self.num_experts * 3 * self.hidden_size * self.moe_ffn_hidden_size

    def layer_dense_params(self) -> int:
        """Parameters of one layer replicated across expert-parallel ranks (everything but experts)."""
        router = self.hidden_size * self.num_experts
        return self.attention_params() + (router if self.is_moe else self.dense_mlp_params())

    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def total_params(self) -> int:
        outputs = 1 if self.tied_embeddings else 2
        per_layer = self.layer_dense_params() + (self.expert_params() if self.is_moe else 0)
        return self.num_layers * per_layer + outputs * self.embedding_params() + self.hidden_size

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """KV-cache bytes one token takes in a rollout engine, over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes


def read_model_shape(config: dict, source: str) -> ModelShape:
    """A ModelShape from a config.json dict; `source` names the file in errors."""
    try:
        heads = config["num_attention_heads"]
        moe = config.get("num_experts") or config.get("num_local_experts") or 0
        return ModelShape(
            model_type=config["model_type"], num_layers=config["num_hidden_layers"],
            hidden_size=config["hidden_size"], num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            ffn_hidden_size=config["intermediate_size"], vocab_size=config["vocab_size"],
            max_position_embeddings=config["max_position_embeddings"],
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
            num_experts=moe, experts_per_token=config.get("num_experts_per_tok", 0) if moe else 0,
            moe_ffn_hidden_size=config.get("moe_intermediate_size", config["intermediate_size"]) if moe else 0)
    except KeyError as err:
        raise ModelConfigError(f"{source} has no {err.args[0]!r}: it is not a decoder config.json the planner "
                               f"can size") from None


def load_model_shape(model_path: str, fallback: str | None = None) -> tuple[ModelShape, str]:
    """The shape of `model_path`'s config.json, else of `fallback`, else of the shipped config of that name.

    The local checkpoint wins because it is what will actually be loaded; the fallback and the
    published configs in examples/model_configs/ exist for planning offline with a hub name such as
    Qwen/Qwen3-8B-Base, which servers and trainer download on the cluster. The returned source says
    which file sized the model, so the plan shows when a shipped config stood in for the checkpoint.
    """
    local = Path(model_path) / "config.json"
    if local.is_file():
        path, source = local, str(local)
    elif fallback:
        path, source = Path(fallback), fallback
    else:
        path = shipped_model_config(model_path)
        source = f"no local copy: sized with the shipped {_shown(path)}, matched by name"
    if not path.is_file():
        raise ModelConfigError(f"--model-config {str(path)!r} does not exist: pass a model's config.json")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ModelConfigError(f"{path} is not valid JSON: {err}") from None
    return read_model_shape(config, str(path)), source


def shipped_model_config(model_path: str) -> Path:
    """examples/model_configs/<name>.json for a model.path whose last component is <name>, e.g. Qwen/Qwen3-8B-Base."""
    name = model_path.rstrip("/").rsplit("/", 1)[-1]
    shipped = sorted(MODEL_CONFIGS.glob("*.json"))
    match = next((path for path in shipped if path.stem == name), None)
    if match is None:
        names = ", ".join(path.name for path in shipped) or "none"
        raise ModelConfigError(f"model.path={model_path!r} has no config.json here and no shipped config is named "
                               f"{name}.json: point model.path at a local checkpoint directory, or pass "
                               f"--model-config FILE (shipped in {_shown(MODEL_CONFIGS)}: {names})")
    return match


def _shown(path: Path) -> str:
    """`path` relative to the working directory when it lies below it (as in a checkout), else absolute."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
