"""Shadow weights: the momentum (EMA) model and the frozen initial reference, as local shards.

A shadow is one fp32 tensor per local parameter, in exactly the layout of the parameters this rank
holds (the same tensor / pipeline / expert shard), so the EMA update theta_k <- m theta_k +
(1 - m) theta_q needs no communication at all, at any scale, and the weight export that serves
the policy serves the momentum model too. The source is the model parameter itself, which is
what the rollout engines receive; with bf16 parameters the fp32 EMA widens it on the fly.

Forward passes "with the momentum weights" swap the shadow into the module's parameters for the
duration of a `with` block: with matching dtypes the swap exchanges storage pointers (no copy at
all), otherwise it copies the shadow in and restores the parameters bit for bit afterwards. The
module itself is never copied (megatron modules hold process groups and cannot be deep-copied).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from megatron_mgrpo.algo import ema_update_


class ShadowWeights:
    """fp32 copies of `module`'s parameters; `offload=True` keeps them in CPU memory."""

    def __init__(self, module: torch.nn.Module, offload: bool = False):
        self.module = module
        self.names = [name for name, _ in module.named_parameters()]
        self.params = [param for _, param in module.named_parameters()]
        self.offload = offload
        self.tensors = [param.detach().to(device="cpu" if offload else param.device, dtype=torch.float32,
                                          copy=True) for param in self.params]
        if offload and torch.cuda.is_available():  # pinned: the per-step transfers run asynchronously
            self.tensors = [t.pin_memory() for t in self.tensors]

    @property
    def nbytes(self) -> int:
        """Memory the shadow occupies (on the device, or in host memory when offloaded)."""
        return sum(t.nbytes for t in self.tensors)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Parameter names of the module -> shadow tensors: the input of the weight export."""
        return dict(zip(self.names, self.tensors))

    @torch.no_grad()
    def ema_update_(self, momentum: float) -> None:
        """theta_k <- momentum * theta_k + (1 - momentum) * theta_q, shard by shard, no collectives."""
        if not self.offload:
            ema_update_(self.tensors, [p.detach() for p in self.params], momentum)
            return
        for shadow, param in zip(self.tensors, self.params):  # one parameter's worth of transfer at a time
            ema_update_([shadow], [param.detach().to("cpu", non_blocking=True)], momentum)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The module computes with the shadow weights inside the block, with its own weights after."""
        swaps = [param.dtype == shadow.dtype and param.device == shadow.device
                 for param, shadow in zip(self.params, self.tensors)]
        saved = []
        with torch.no_grad():
            for param, shadow, swap in zip(self.params, self.tensors, swaps):
                saved.append(param.data)
                param.data = shadow if swap else shadow.to(device=param.device, dtype=param.dtype)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, original in zip(self.params, saved):
                    param.data = original
