"""The embedded default model, `builtin:tiny-qwen3`: a small Qwen3 with its own tokenizer.

`mgrpo train` with no arguments needs a model without any download. This module writes one as
an ordinary Hugging Face directory (config, safetensors weights, tokenizer), so every other part
of the system (the Megatron provider, the rollout engines, `mgrpo eval`) treats it like any
other checkpoint.

The tokenizer works on single characters: printable ASCII, newline and a few symbols that the
built-in word problems use, plus `\\boxed` as one token (every answer is boxed, so the model
learns the box in one step). Characters make every number spell the same way, which a model
this small needs to learn arithmetic. Chat turns use Qwen's `<|im_start|>` / `<|im_end|>`
markers; `<|im_end|>` is the end-of-sequence token, so a finished assistant turn stops
generation.

The directory is keyed by a digest of everything that shapes it (architecture, vocabulary,
seed), written into a temporary directory and renamed into place, so concurrent processes
and interrupted runs never see a half-written model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import string
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from megatron_mgrpo.answer_format import INSTRUCTION
from megatron_mgrpo.config import ConfigError

PREFIX = "builtin:"
CACHE_ENV = "MGRPO_CACHE"
SPECIAL_TOKENS = ("<pad>", "<unk>", "<|im_start|>", "<|im_end|>")
# Added as single tokens (not special, so decoding keeps them): `\\boxed`, and the phrases every
# built-in prompt repeats verbatim (the template's instruction, the sum task's question stem).
# Spelled out in characters they would put ~100 positions between the numbers of a question and
# its answer, which a model this small learns to bridge only after many times more steps.
WORD_TOKENS = ("\\boxed", INSTRUCTION, "State the final answer to the following arithmetic problem: ")
# Symbols of the built-in word problems (currencies) and of common maths answers.
EXTRA_CHARS = "£€¥°×÷−·²³√π"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class BuiltinSpec:
    """Architecture and initialisation of a built-in model.

    head_dim stays >= 32 so that vLLM's CPU attention kernels can serve the model too; the
    embeddings are untied like Qwen3's larger models, which the weight maps expect.
    """

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rope_theta: float
    seed: int


BUILTINS = {
    "tiny-qwen3": BuiltinSpec(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=32, max_position_embeddings=2048,
                              rope_theta=1_000_000.0, seed=0),
}


def default_cache_dir() -> Path:
    """Where built-in models are kept: $MGRPO_CACHE, else ~/.cache/megatron_mgrpo."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "megatron_mgrpo")


def vocabulary() -> list[str]:
    """Every token of the built-in tokenizer, in id order: special tokens first."""
    chars = string.digits + string.ascii_letters + string.punctuation + " \n" + EXTRA_CHARS
    return [*SPECIAL_TOKENS, *dict.fromkeys(chars), *WORD_TOKENS]


def build_tokenizer():
    """The character-level fast tokenizer of the built-in models."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = vocabulary()
    core = Tokenizer(models.WordLevel({token: i for i, token in enumerate(tokens)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    core.add_tokens([AddedToken(t, special=False, normalized=False) for t in WORD_TOKENS])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<|im_end|>",
                                        unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(spec: BuiltinSpec, tokenizer):
    """A randomly initialised Qwen3ForCausalLM for `spec` (seeded, so every machine gets the same)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads, head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings, rope_theta=spec.rope_theta,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, dtype="float32")
    torch.manual_seed(spec.seed)
    model = Qwen3ForCausalLM(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _digest(spec: BuiltinSpec) -> str:
    """Identifies the files a spec produces; any change to the spec or vocabulary changes it."""
    payload = json.dumps({"spec": asdict(spec), "vocab": vocabulary(), "template": CHAT_TEMPLATE}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def materialize_builtin(name: str, cache_dir: str | Path | None = None) -> Path:
    """The HF directory of built-in model `name`, written on first use and reused afterwards."""
    if name not in BUILTINS:
        raise ConfigError(f"model.path={PREFIX}{name} is not a built-in model; choose one of: "
                         f"{', '.join(PREFIX + n for n in BUILTINS)}")
    spec = BUILTINS[name]
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / "models" / f"{name}-{_digest(spec)}"
    if target.is_dir():
        return target
    tokenizer = build_tokenizer()
    save_hf_directory(build_model(spec, tokenizer), tokenizer, target)
    return target


def save_hf_directory(model, tokenizer, target: Path) -> None:
    """`save_pretrained` of model and tokenizer into `target`, published all at once: written into
    a temporary sibling and renamed, so a reader (or a concurrent writer of the same cache entry)
    never sees a half-written directory. Call it from one process only: in an initialised process
    group, transformers writes the weights on rank 0 alone."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.rename(staging, target)
    except OSError:
        if not target.is_dir():  # not a concurrent writer that finished first: a real error
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def resolve_model_path(path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """A model directory for `path`: `builtin:<name>` is materialised, anything else must exist."""
    text = str(path)
    if text.startswith(PREFIX):
        return materialize_builtin(text[len(PREFIX):], cache_dir)
    directory = Path(text)
    if not (directory / "config.json").is_file():
        raise ConfigError(f"model path {text!r} is not a Hugging Face model directory (no config.json): pass a "
                         f"directory written by save_pretrained, or one of "
                         f"{', '.join(PREFIX + n for n in BUILTINS)}")
    return directory
