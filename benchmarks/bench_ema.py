"""EMA update bandwidth: our `ema_update_` vs one `lerp_` over a single flat fp32 buffer.

~100M parameters over ~100 tensors of mixed sizes (a small transformer's worth of shapes), for
fp32 sources and for bf16 sources with an fp32 EMA. The flat lerp is the machine's streaming
limit (plain `copy_` is slower on CPU, so it is no reference); it is timed in the same rounds
as our update, alternating, so that load from other processes hits both alike. Bytes counted
per element: fp32 source 12 (read EMA, read source, write EMA), bf16 source 10.
On a shared machine whose cores are being taken by others (the flat baseline far below its
quiet value, ~30 GB/s on the 2-core development VM) the ~100 per-tensor parallel regions
suffer more than one flat region: read fractions from runs with the baseline at its quiet level.
Run: python benchmarks/bench_ema.py
"""

import statistics
import time
from collections.abc import Callable

import torch

from megatron_mgrpo.algo import ema_update_


def shapes(hidden: int = 640, layers: int = 14, vocab: int = 8000) -> list[tuple[int, ...]]:
    """A Qwen3-like layout: embedding, per layer qkv, proj, fc1 (gate+up), fc2 and three norms, head."""
    per_layer = [(3 * hidden, hidden), (hidden, hidden), (8 * hidden, hidden), (hidden, 4 * hidden),
                 (hidden,), (hidden,), (hidden // 8,)]
    return [(vocab, hidden)] + per_layer * layers + [(hidden,), (vocab, hidden)]


def alternating_medians(fns: dict[str, Callable[[], object]], reps: int = 7) -> dict[str, float]:
    """Median seconds of each function over `reps` rounds that run every function once, after a warm-up."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    torch.manual_seed(0)
    layout = shapes()
    n = sum(torch.Size(s).numel() for s in layout)
    print(f"{len(layout)} tensors, {n / 1e6:.1f}M parameters, {torch.get_num_threads()} threads")
    flat_ema, flat_src = torch.randn(n), torch.randn(n)
    ema = [torch.randn(s) for s in layout]
    fractions = {}
    for dtype, bytes_per in ((torch.float32, 12), (torch.bfloat16, 10)):
        src = [torch.randn(s).to(dtype) for s in layout]
        start = time.perf_counter()
        ema_update_(ema, src, 0.99)
        first = time.perf_counter() - start
        seconds = alternating_medians({"flat": lambda: flat_ema.lerp_(flat_src, 0.01),
                                       "ours": lambda: ema_update_(ema, src, 0.99)})
        flat, ours = n * 12 / seconds["flat"] / 1e9, n * bytes_per / seconds["ours"] / 1e9
        fractions[dtype] = ours / flat
        print(f"{str(dtype):15s} source: flat fp32 lerp_ {flat:5.1f} GB/s, ema_update_ {ours:5.1f} GB/s "
              f"(first call {first:.1f} s)")
    for dtype, fraction in fractions.items():
        print(f"fraction of flat-lerp bandwidth, {dtype} source: {fraction:.2f}")


if __name__ == "__main__":
    main()
