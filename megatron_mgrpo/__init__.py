"""megatron_mgrpo: M-GRPO label-free reinforcement learning on megatron-core.

Importing the package is cheap and never touches GPU-only libraries (Transformer Engine,
SGLang, vLLM): those are imported lazily by the components that need them.
"""

__version__ = "0.1.0"
