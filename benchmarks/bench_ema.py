"""EMA update bandwidth: our `ema_update_` vs one `lerp_` over a single flat fp32 buffer.

~100M parameters over ~100 tensors of mixed sizes (a small transformer's worth of shapes), for
fp32 sources and bf16 sources with an fp32 EMA. The flat lerp in the same run is the machine's
streaming limit (plain `copy_` is slower on this CPU, so it is no reference). Bytes counted per
element: fp32 source 12 (read EMA, read source, write EMA), bf16 source 10.
Run: python benchmarks/bench_ema.py
"""

import time

import torch
from timing import median_seconds

from megatron_mgrpo.algo import ema_update_


def shapes(hidden: int = 640, layers: int = 14, vocab: int = 8000) -> list[tuple[int, ...]]:
    """A Qwen3-like layout: per layer qkv, proj, fc1 (gate+up), fc2 and three norms."""
    per_layer = [(3 * hidden, hidden), (hidden, hidden), (8 * hidden, hidden), (hidden, 4 * hidden),
                 (hidden,), (hidden,), (hidden // 8,)]
    return [(vocab, hidden)] + per_layer * layers + [(hidden,), (vocab, hidden)]


def main() -> None:
    torch.manual_seed(0)
    layout = shapes()
    n = sum(torch.Size(s).numel() for s in layout)
    print(f"{len(layout)} tensors, {n / 1e6:.1f}M parameters, {torch.get_num_threads()} threads")
    flat_ema, flat_src = torch.randn(n), torch.randn(n)
    flat = n * 12 / median_seconds(lambda: flat_ema.lerp_(flat_src, 0.01)) / 1e9
    print(f"flat fp32 lerp_ (streaming limit): {flat:6.1f} GB/s")
    del flat_ema, flat_src
    ema = [torch.randn(s) for s in layout]
    fractions = {}
    for dtype, bytes_per in ((torch.float32, 12), (torch.bfloat16, 10)):
        src = [torch.randn(s).to(dtype) for s in layout]
        start = time.perf_counter()
        ema_update_(ema, src, 0.99)  # first call compiles
        first = time.perf_counter() - start
        ours = n * bytes_per / median_seconds(lambda: ema_update_(ema, src, 0.99)) / 1e9
        fractions[dtype] = ours / flat
        print(f"ema_update_ {str(dtype):15s}: {ours:6.1f} GB/s  (first call incl. compile {first:.1f} s)")
        del src
    for dtype, fraction in fractions.items():
        print(f"fraction of flat-lerp bandwidth, {dtype} source: {fraction:.2f}")


if __name__ == "__main__":
    main()
