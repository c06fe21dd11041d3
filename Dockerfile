# megatron_mgrpo on GPU: NGC PyTorch (CUDA, Transformer Engine, apex) + megatron-core for the
# trainer; SGLang and vLLM each in their own virtual environment, because both pin their own
# torch and must not replace the trainer's. Every version is pinned; bump them together.
#   docker build -t megatron_mgrpo:0.1.0 .
# Rollout servers run with ENGINE_PYTHON (SGLang) or /opt/engines/vllm/bin/python (vLLM):
# the Slurm scripts pass it on as launch.engine_python.
FROM nvcr.io/nvidia/pytorch:26.09-py3

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    ENGINE_PYTHON=/opt/engines/sglang/bin/python

# Trainer environment: the image's python, torch, Transformer Engine and apex are kept as they are.
RUN python3 -m pip install \
        megatron-core==0.19.2 \
        nvidia-modelopt==0.47.0 \
        wandb==0.31.0

# Rollout engines, isolated from the trainer's torch.
RUN python3 -m venv /opt/engines/sglang \
    && /opt/engines/sglang/bin/pip install "sglang[all]==0.5.23" \
    && python3 -m venv /opt/engines/vllm \
    && /opt/engines/vllm/bin/pip install vllm==0.33.0

# The project itself (editable, so examples/ and its configs sit next to the code).
RUN useradd --create-home --uid 1000 mgrpo
WORKDIR /opt/megatron_mgrpo
COPY --chown=mgrpo:mgrpo . .
# The vLLM environment needs the package too: its servers load the project's weight-sync worker.
RUN python3 -m pip install -e . \
    && /opt/engines/vllm/bin/pip install --no-deps -e .

USER 1000:1000
# Smoke test at build time: the CLI starts and the paper's recipe plans on its 8 x H100 node.
RUN mgrpo --help > /dev/null \
    && mgrpo launch --config examples/configs/mgrpo_qwen3_4b_math.yaml \
        --model-config examples/model_configs/Qwen3-4B-Base.json --dry-run > /dev/null

CMD ["mgrpo", "--help"]
