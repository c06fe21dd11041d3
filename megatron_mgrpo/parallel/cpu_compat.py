"""The CPU adaptation of megatron-core: the only place that patches it, applied only without CUDA.

megatron-core assumes CUDA in a handful of places that have nothing to do with the maths: it
asks `torch.cuda.current_device()` where to allocate, synchronizes streams, builds a few tensors
with a literal `device="cuda"`, and keeps its model-parallel RNG streams in CUDA generators. On a
machine without CUDA each of these raises; redirecting them to the CPU lets the very same model,
parallel layers and schedules run on gloo, which is how the project tests tensor and pipeline
parallelism without GPUs. On a machine with CUDA `apply_cpu_compat()` changes nothing.

Patches (megatron-core 0.16.1), each listed with what fails without it:
- `torch.cuda.current_device` -> the CPU device, process-wide (see `_allocate_on_cpu`).
- `megatron.core.transformer.utils.get_default_causal_mask` (and its alias in
  `megatron.core.fusions.fused_softmax`) -> the same mask built on the CPU.
- `megatron.core.pipeline_parallel.schedules.torch` and `.p2p_communication.torch` -> a view of
  torch whose tensor factories map `device="cuda"` to the CPU and whose `cuda.synchronize` is a no-op.
- `LanguageModule.setup_embeddings_and_output_layer` -> the same, with `Tensor.cuda` the identity
  while it runs.
- `megatron.core.tensor_parallel.random._CUDA_RNG_STATE_TRACKER` -> a tracker of CPU generator states.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import types

import torch

log = logging.getLogger(__name__)
_applied = False

#: megatron modules that allocate with a literal device="cuda" or synchronize CUDA streams.
CUDA_LITERAL_MODULES = (
    "megatron.core.pipeline_parallel.schedules",  # token counters and loss accumulators on "cuda"
    "megatron.core.pipeline_parallel.p2p_communication",  # torch.cuda.synchronize after batched send/recv
)


def apply_cpu_compat() -> bool:
    """Adapt megatron-core to the CPU if CUDA is unavailable; idempotent. Returns whether it applies."""
    global _applied
    if torch.cuda.is_available():
        log.debug("CUDA is available: megatron-core runs unpatched")
        return False
    if _applied:
        return True
    _allocate_on_cpu()
    _build_causal_mask_on_cpu()
    for name in CUDA_LITERAL_MODULES:
        _give_module_a_cpu_torch(importlib.import_module(name))
    _keep_tied_embedding_copy_on_cpu()
    _install_cpu_rng_tracker()
    _applied = True
    log.info("megatron-core adapted for CPU (no CUDA device): %s", ", ".join(CUDA_LITERAL_MODULES))
    return True


def _allocate_on_cpu() -> None:
    """Without it: RoPE frequencies, the global memory buffer (local attention), TP gathers and PP
    shape exchanges raise "Torch not compiled with CUDA enabled".

    megatron calls `torch.cuda.current_device()` in some sixty places, so this one is patched on
    torch itself rather than module by module; on a build or machine without CUDA the original can
    only raise, so no caller that worked before changes behaviour (`torch.cuda.is_available()`
    still says False).
    """
    torch.cuda.current_device = lambda: torch.device("cpu")


def _build_causal_mask_on_cpu() -> None:
    """Without it: local attention's implicit causal mask is created with device="cuda" and raises."""
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils

    @functools.lru_cache(maxsize=16)
    def cpu_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

    utils.get_default_causal_mask = fused_softmax.get_default_causal_mask = cpu_causal_mask


def _give_module_a_cpu_torch(module: types.ModuleType) -> None:
    """Without it: the pipeline schedules fail on `torch.zeros(..., device="cuda")` and the
    batched p2p exchange on `torch.cuda.synchronize()`.

    Only `module` sees this view (its global name `torch` is rebound); torch itself is untouched,
    and every attribute other than the factories and `cuda.synchronize` is torch's own.
    """
    def on_cpu(factory):
        @functools.wraps(factory)
        def create(*args, device=None, **kwargs):
            if device is not None and str(device).startswith("cuda"):
                device = "cpu"
            return factory(*args, device=device, **kwargs)
        return create

    cuda = types.ModuleType("torch.cuda")
    cuda.__getattr__ = lambda name: getattr(torch.cuda, name)
    cuda.synchronize = lambda device=None: None
    view = types.ModuleType("torch")
    view.__getattr__ = lambda name: getattr(torch, name)
    view.cuda = cuda
    for name in ("zeros", "ones", "empty", "full", "tensor", "arange"):
        setattr(view, name, on_cpu(getattr(torch, name)))
    module.torch = view


def _keep_tied_embedding_copy_on_cpu() -> None:
    """Without it: a model with tied embeddings and several pipeline stages fails to build, because
    the last stage's copy of the embedding is moved with `.cuda()` before its initial all-reduce."""
    from megatron.core.models.common.language_module.language_module import LanguageModule

    setup = LanguageModule.setup_embeddings_and_output_layer

    @functools.wraps(setup)
    def setup_on_cpu(self) -> None:
        to_cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda tensor, *args, **kwargs: tensor
        try:
            setup(self)
        finally:
            torch.Tensor.cuda = to_cuda

    LanguageModule.setup_embeddings_and_output_layer = setup_on_cpu


def _install_cpu_rng_tracker() -> None:
    """Without it: `model_parallel_cuda_manual_seed` and every `tracker.fork()` in the parallel
    layers (per-TP-rank weight init, dropout) call the CUDA generator and raise.

    megatron's tracker stores and swaps CUDA generator states; this one stores CPU generator
    states under the same names, so seeding and forking work unchanged.
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
