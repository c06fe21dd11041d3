"""The momentum (EMA) update: theta_k <- m theta_k + (1 - m) theta_q, in place, in fp32.

It runs after every optimizer step on every local shard, so it must stream memory at the
machine's limit. Written as `ema.lerp_(src, 1 - m)` it reads the EMA and the source once and
writes the EMA once (12 bytes per parameter with an fp32 source, 10 with bf16).

- fp32 sources: `torch._foreach_lerp_`, one fused eager call over the whole list.
- bf16 sources: eager PyTorch has no fused path (`lerp_` refuses a bf16 end; casting first
  costs an extra pass and halves the bandwidth), so the list goes through one `torch.compile`d
  function that widens the source in registers. It compiles once per list structure (count,
  shapes, strides, device), which is fixed during training; the first call pays the compile,
  which grows with the number of tensors (on a 2-core CPU ~20-50 s for 100 tensors, ~8 s from
  inductor's on-disk cache): hand over flat buffers where the parameters live in them (one
  tensor, one kernel). The weight 1 - m is passed as a 0-d tensor, so another momentum
  value reuses the compiled code instead of recompiling. Where compiling is impossible (no
  C++ compiler, unsupported Python) or fails, a per-tensor cast + lerp_ takes over, with a
  warning: same result, about half the speed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import torch

log = logging.getLogger(__name__)
_compiled_lerp: Callable[[list[torch.Tensor], list[torch.Tensor], torch.Tensor], None] | None = None
_compile_failed = False


def _lerp_widening(ema: list[torch.Tensor], src: list[torch.Tensor], weight: torch.Tensor) -> None:
    for e, s in zip(ema, src):
        e.lerp_(s.to(e.dtype), weight)


def _lerp_from_bf16(ema: list[torch.Tensor], src: list[torch.Tensor], weight: float) -> None:
    """Compiled fused update when possible, the eager per-tensor one otherwise."""
    global _compiled_lerp, _compile_failed
    weight_tensor = torch.tensor(weight, dtype=torch.float32, device=ema[0].device)
    if not _compile_failed and torch._dynamo.is_dynamo_supported():
        try:
            if _compiled_lerp is None:
                # not fullgraph: past dynamo's recompile limit (8 list structures) a new structure
                # runs eagerly while the compiled ones stay compiled, instead of raising
                _compiled_lerp = torch.compile(_lerp_widening, dynamic=False)
            _compiled_lerp(ema, src, weight_tensor)
            return
        except torch._dynamo.exc.TorchDynamoException as err:  # raised while compiling: nothing updated yet
            _compile_failed = True
            log.warning("compiled EMA update unavailable, using the eager one (half the speed): %s", err)
    _lerp_widening(ema, src, weight_tensor)


def _check(ema: Sequence[torch.Tensor], src: Sequence[torch.Tensor], momentum: float) -> None:
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"algo.momentum={momentum} must be in [0, 1] (the paper uses 0.99)")
    if len(ema) != len(src):
        raise ValueError(f"the EMA has {len(ema)} tensors but the source has {len(src)}: the momentum "
                         f"copy must mirror the local parameter shards one to one, in the same order")
    for i, (e, s) in enumerate(zip(ema, src)):
        if e.dtype != torch.float32:
            raise ValueError(f"EMA tensor {i} is {e.dtype}; keep the momentum copy in fp32 (in bf16, "
                             f"a step of (1 - m) * difference mostly rounds away)")
        if s.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"source tensor {i} is {s.dtype}; expected fp32 or bf16")
        if e.shape != s.shape or e.device != s.device:
            raise ValueError(f"EMA tensor {i} is {tuple(e.shape)} on {e.device} but its source is "
                             f"{tuple(s.shape)} on {s.device}; they must match")


@torch.no_grad()
def ema_update_(ema: Sequence[torch.Tensor], src: Sequence[torch.Tensor], momentum: float) -> None:
    """In place: ema[i] <- momentum * ema[i] + (1 - momentum) * src[i].

    `ema`: fp32 tensors; `src`: fp32 or bf16 tensors of the same shapes and devices (a list
    may mix both). momentum = 1 leaves the EMA untouched and momentum = 0 copies the source,
    both exactly.
    """
    _check(ema, src, momentum)
    if momentum == 1.0 or not ema:
        return
    if momentum == 0.0:
        torch._foreach_copy_(list(ema), list(src))
        return
    weight = 1.0 - momentum
    fp32 = [(e, s) for e, s in zip(ema, src) if s.dtype == torch.float32]
    bf16 = [(e, s) for e, s in zip(ema, src) if s.dtype == torch.bfloat16]
    if fp32:
        torch._foreach_lerp_([e for e, _ in fp32], [s for _, s in fp32], weight)
    if bf16:
        _lerp_from_bf16([e for e, _ in bf16], [s for _, s in bf16], weight)


def momentum_at(step: int, total_steps: int, start: float, final: float, schedule: str = "constant") -> float:
    """m for optimizer step `step` (1-based) of `total_steps`: `start` throughout (constant), or a half
    cosine from `start` at the first step to `final` at the last (cosine); 1 - m follows the same
    curve, so m = 0.99 -> 0.99999 lengthens the EMA's memory from ~100 to ~100,000 steps."""
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"algo.momentum_schedule={schedule!r} is not one of constant, cosine")
    if schedule == "constant" or total_steps <= 1:
        return start
    progress = min(max(step - 1, 0) / (total_steps - 1), 1.0)
    return final + (start - final) * 0.5 * (1.0 + math.cos(math.pi * progress))
