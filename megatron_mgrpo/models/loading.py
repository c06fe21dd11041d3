"""Loading a Hugging Face checkpoint with its weights checked against its architecture.

transformers loads a directory whose config.json names another architecture than its weights
(GPTNeoX over Qwen3 tensors) by initialising every parameter at random and printing a table;
the caller then trains or scores a random model and nothing fails. Every load of an HF model in
this project goes through `load_hf_model`, which refuses that, and names an unreadable weights
file instead of letting safetensors' "incomplete metadata" escape.
"""

from __future__ import annotations

from pathlib import Path

import torch

_SHOWN = 3  # weight names quoted per kind in an error


class ModelLoadError(ValueError):
    """An HF model directory whose weights cannot be read or do not fit its config.json."""


def load_hf_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """`AutoModelForCausalLM` from `path`, every weight of the architecture loaded from the files."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
    except SafetensorError as err:
        raise ModelLoadError(f"{_unreadable_file(Path(path))} cannot be read ({err}): the file is truncated or "
                             f"corrupt; copy or download it again") from None
    except RuntimeError as err:
        if "size mismatch" not in str(err):
            raise
        detail = str(err).splitlines()[-1].strip()
        raise ModelLoadError(f"{path}: a weight's shape does not match config.json ({detail})") from None
    problems = [f"{len(info[key])} {kind} (e.g. {', '.join(sorted(info[key])[:_SHOWN])})"
                for key, kind in (("missing_keys", "missing"), ("unexpected_keys", "unexpected"))
                if info[key]]
    if problems:
        raise ModelLoadError(f"{path}: its weights do not fit the architecture its config.json names "
                             f"({type(model).__name__}): {'; '.join(problems)} weights; config.json and the "
                             f"safetensors files come from different models")
    return model


def _unreadable_file(path: Path) -> Path:
    """The first safetensors file of `path` whose header safetensors cannot read (else `path`)."""
    from safetensors import SafetensorError, safe_open

    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(file, framework="pt") as handle:
                for name in handle.keys():
                    handle.get_slice(name)
        except SafetensorError:
            return file
    return path
