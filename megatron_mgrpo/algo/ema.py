"""The momentum (EMA) update: theta_k <- m theta_k + (1 - m) theta_q, in place, in fp32.

It runs after every optimizer step on every local shard, so it must stream memory at the
machine's limit. Written as `lerp_(src, 1 - m)` it reads the EMA and the source once and writes
the EMA once. Eager PyTorch has no single fused op for a list of fp32 EMAs with bf16 sources
(`lerp_` refuses mixed dtypes, and casting first costs another pass), and even for fp32
sources `_foreach_lerp_` leaves ~10 % on the table; so the whole list goes through one
`torch.compile`d function, which fuses the cast into the update. Compilation happens once per
list structure (shapes, dtypes) and momentum value, both fixed during training; where compiling
is impossible (no C++ compiler) the update falls back to eager foreach / per-tensor lerp.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

log = logging.getLogger(__name__)
_compile_failed = False


def _lerp_list(ema: list[torch.Tensor], src: list[torch.Tensor], weight: float) -> None:
    for e, s in zip(ema, src):
        e.lerp_(s.to(e.dtype), weight)


_lerp_list_compiled = torch.compile(_lerp_list, dynamic=False)


def _lerp_list_eager(ema: list[torch.Tensor], src: list[torch.Tensor], weight: float) -> None:
    same = [(e, s) for e, s in zip(ema, src) if s.dtype == e.dtype]
    if same:
        torch._foreach_lerp_([e for e, _ in same], [s for _, s in same], weight)
    for e, s in zip(ema, src):
        if s.dtype != e.dtype:
            e.lerp_(s.to(e.dtype), weight)


@torch.no_grad()
def ema_update_(ema: Sequence[torch.Tensor], src: Sequence[torch.Tensor], momentum: float) -> None:
    """In place: ema[i] <- momentum * ema[i] + (1 - momentum) * src[i].

    `ema` tensors are fp32; `src` tensors are fp32 or bf16 of the same shapes. momentum = 1
    leaves the EMA untouched and momentum = 0 copies the source exactly.
    """
    global _compile_failed
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"algo.momentum={momentum} must be in [0, 1]")
    if len(ema) != len(src):
        raise ValueError(f"EMA has {len(ema)} tensors but the source has {len(src)}: "
                         f"the momentum copy must mirror the local parameter shards one to one")
    for i, (e, s) in enumerate(zip(ema, src)):
        if e.dtype != torch.float32:
            raise ValueError(f"EMA tensor {i} is {e.dtype}; the momentum copy must be kept in fp32")
        if e.shape != s.shape:
            raise ValueError(f"EMA tensor {i} has shape {tuple(e.shape)} but its source has {tuple(s.shape)}")
        if s.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"source tensor {i} is {s.dtype}; expected fp32 or bf16")
    if momentum == 1.0 or not ema:
        return
    ema, src, weight = list(ema), list(src), 1.0 - momentum
    if not _compile_failed:
        try:
            _lerp_list_compiled(ema, src, weight)
            return
        except Exception as err:  # no C++ compiler, unsupported backend: stay correct, just slower
            _compile_failed = True
            log.warning("compiled EMA update unavailable (%s); using the eager update", err)
    _lerp_list_eager(ema, src, weight)
