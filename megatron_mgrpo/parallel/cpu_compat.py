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
- `megatron.core.pipeline_parallel.schedules.torch` and `.p2p_communication.torch` (and the other
  `CUDA_LITERAL_MODULES`: optimizer, grad clipping, checkpoint writer) -> a view of torch whose
  tensor factories map `device="cuda"` to the CPU and whose `cuda.synchronize` is a no-op.
- `LanguageModule.setup_embeddings_and_output_layer` -> the same, with `Tensor.cuda` the identity
  while it runs; likewise `DistributedOptimizer.get_parameter_state_dp_zero`
  (the optimizer-state gather of a reshardable checkpoint save).
- `DistributedOptimizer._set_main_param_and_optimizer_states` -> the same, given torch Adam's
  `step` back (see `_load_optimizer_state_with_torch_adam_step`).
- `megatron.core.tensor_parallel.random._CUDA_RNG_STATE_TRACKER` -> a tracker of CPU generator states.
- `megatron.core.transformer.moe.moe_utils.te_general_gemm` -> None when Transformer Engine is
  absent, so the MoE router takes its torch matmul path (see `_route_moe_without_te`).
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
    "megatron.core.optimizer.optimizer",  # loss-scale and found-inf flags on "cuda"
    "megatron.core.optimizer.clip_grads",  # the all-reduced total norm and the zero counter on "cuda"
    "megatron.core.optimizer.distrib_optimizer",  # torch.cuda.synchronize around the parameter gather
    "megatron.core.utils",  # the fallback multi-tensor L2 norm (no apex / TE) returns it on "cuda"
    "megatron.core.dist_checkpointing.strategies.filesystem_async",  # torch.cuda.synchronize before a save writes
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
    _gather_optimizer_state_on_cpu()
    _load_optimizer_state_with_torch_adam_step()
    _accept_cpu_tensor_types_in_optimizer()
    _install_cpu_rng_tracker()
    _route_moe_without_te()
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


def _tensor_cuda_is_identity(method):
    """`method` with `Tensor.cuda` returning the tensor itself while it runs (a no-op move)."""
    @functools.wraps(method)
    def on_cpu(*args, **kwargs):
        to_cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda tensor, *a, **k: tensor
        try:
            return method(*args, **kwargs)
        finally:
            torch.Tensor.cuda = to_cuda

    return on_cpu


def _keep_tied_embedding_copy_on_cpu() -> None:
    """Without it: a model with tied embeddings and several pipeline stages fails to build, because
    the last stage's copy of the embedding is moved with `.cuda()` before its initial all-reduce."""
    from megatron.core.models.common.language_module.language_module import LanguageModule

    LanguageModule.setup_embeddings_and_output_layer = _tensor_cuda_is_identity(
        LanguageModule.setup_embeddings_and_output_layer)


def _gather_optimizer_state_on_cpu() -> None:
    """Without it: saving the distributed optimizer in its reshardable format fails, because the
    gather of the optimizer state onto data-parallel rank 0 moves each buffer with `.cuda()`."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    DistributedOptimizer.get_parameter_state_dp_zero = _tensor_cuda_is_identity(
        DistributedOptimizer.get_parameter_state_dp_zero)


def _load_optimizer_state_with_torch_adam_step() -> None:
    """Without it: loading a distributed optimizer checkpoint fails with KeyError 'step'.

    Without apex / TE (always so on CPU) the inner optimizer is torch's Adam, whose per-parameter
    state holds a `step` tensor. megatron restores that step from the param groups and leaves it out
    of the tensors it copies back per parameter, then copies every state entry, step included;
    handing the step back as its own source makes that copy a no-op.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    set_states = DistributedOptimizer._set_main_param_and_optimizer_states

    @functools.wraps(set_states)
    def set_states_keeping_step(self, model_param, tensors):
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
            if "step" in state:
                tensors = {**tensors, "step": state["step"]}
        set_states(self, model_param, tensors)

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states_keeping_step


@contextlib.contextmanager
def _cpu_tensors_typed_as_cuda():
    """While active, `tensor.type()` names a CPU tensor as its CUDA twin (torch.FloatTensor ->
    torch.cuda.FloatTensor); with arguments, `type` converts as usual."""
    original = torch.Tensor.type

    def cuda_name(tensor, *args, **kwargs):
        name = original(tensor, *args, **kwargs)
        if args or kwargs or tensor.is_cuda:
            return name
        return name.replace("torch.", "torch.cuda.", 1)

    torch.Tensor.type = cuda_name
    try:
        yield
    finally:
        torch.Tensor.type = original


def _accept_cpu_tensor_types_in_optimizer() -> None:
    """Without it: the distributed optimizer refuses every parameter ("Wrapped parameters must be
    one of torch.cuda.FloatTensor, ...") and grad clipping asserts `grad.type() ==
    'torch.cuda.FloatTensor'`: both decide by the type name, which says cuda only for CUDA tensors.

    The name is remapped only while those two functions run, so nothing else sees it.
    """
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    def typed_as_cuda(function):
        @functools.wraps(function)
        def run(*args, **kwargs):
            with _cpu_tensors_typed_as_cuda():
                return function(*args, **kwargs)
        return run

    optimizer_class = distrib_optimizer.DistributedOptimizer
    optimizer_class.__init__ = typed_as_cuda(optimizer_class.__init__)
    clip_grads.clip_grad_by_total_norm_fp32 = typed_as_cuda(clip_grads.clip_grad_by_total_norm_fp32)
    optimizer.clip_grad_by_total_norm_fp32 = clip_grads.clip_grad_by_total_norm_fp32  # its imported alias


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


def _route_moe_without_te() -> None:
    """Without it: every MoE forward raises NameError: name 'te_general_gemm' is not defined.

    The router's gating matmul tests `te_general_gemm is not None`, but that name is only bound
    when Transformer Engine imports; defining it as None selects the plain torch matmul that
    megatron already has for this case. A bound name (TE present) is left alone.
    """
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
