"""The CPU adaptation of megatron-core: the only place that patches it, applied only without CUDA.

megatron-core assumes CUDA in a handful of places that have nothing to do with the maths: it
asks `torch.cuda.current_device()` where to allocate, synchronizes streams, and keeps its
model-parallel RNG streams in CUDA generators. On a machine without CUDA each of these raises;
redirecting them to the CPU lets the very same model, parallel layers and schedules run on gloo,
which is how the project tests tensor / pipeline / expert parallelism without GPUs. On a GPU
machine `apply_cpu_compat()` changes nothing.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import types

import torch

log = logging.getLogger(__name__)
_applied = False


def apply_cpu_compat() -> bool:
    """Patch megatron-core for CPU if CUDA is unavailable; idempotent. Returns whether it applies."""
    global _applied
    if torch.cuda.is_available():
        return False
    if _applied:
        return True
    # RoPE, the global memory buffer, TP layers and collectives, PP communication and checkpointing
    # all allocate on `torch.cuda.current_device()`, which raises without CUDA.
    torch.cuda.current_device = lambda: torch.device("cpu")
    # Checkpoint save and PP schedules synchronize streams that do not exist on CPU.
    torch.cuda.synchronize = lambda device=None: None
    _install_cpu_rng_tracker()
    _patch_default_causal_mask()
    _redirect_cuda_allocations("megatron.core.pipeline_parallel.schedules")
    _applied = True
    log.info("megatron-core adapted for CPU (no CUDA device)")
    return True


def _redirect_cuda_allocations(module_name: str) -> None:
    """Give one megatron module a `torch` whose tensor factories turn device="cuda" into the CPU.

    The pipeline schedules allocate their bookkeeping tensors (token counts, loss accumulators)
    with a literal device="cuda". Only that module sees the proxy; torch itself is untouched.
    """
    import importlib

    module = importlib.import_module(module_name)

    def on_cpu(factory):
        @functools.wraps(factory)
        def create(*args, device=None, **kwargs):
            if device is not None and str(device).startswith("cuda"):
                device = "cpu"
            return factory(*args, device=device, **kwargs)
        return create

    proxy = types.ModuleType("torch")
    proxy.__getattr__ = lambda name: getattr(torch, name)
    for name in ("zeros", "ones", "empty", "full", "tensor", "arange"):
        setattr(proxy, name, on_cpu(getattr(torch, name)))
    module.torch = proxy


def _patch_default_causal_mask() -> None:
    """The softmax's implicit causal mask is built with a hard-coded `device="cuda"`."""
    import functools

    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils

    @functools.lru_cache(maxsize=16)
    def cpu_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

    utils.get_default_causal_mask = fused_softmax.get_default_causal_mask = cpu_causal_mask


def _install_cpu_rng_tracker() -> None:
    """Model-parallel RNG streams (per-TP-rank init and dropout) forked from the CPU generator.

    megatron's tracker stores and swaps CUDA generator states; ours stores CPU generator states
    under the same names, so `model_parallel_cuda_manual_seed` and every `tracker.fork()` in the
    parallel layers work unchanged.
    """
    from megatron.core.tensor_parallel import random as mp_random

    class CpuRNGStatesTracker(mp_random.CudaRNGStatesTracker):
        def add(self, name, seed):
            if seed in self.seeds_ or name in self.states_:
                raise RuntimeError(f"RNG stream {name!r} / seed {seed} already registered")
            self._is_initialized = True
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name=mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise RuntimeError(f"RNG stream {name!r} was never added")
            outer = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)

    mp_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
