"""Vocab-parallel log-probs + entropy vs the naive path that gathers full logits, at TP=2.

Two gloo processes each hold half of a [tokens, 151936] fp32 logits tensor (Qwen3's padded
vocabulary). Naive: all-gather the halves, log_softmax, pick the targets, entropy from the full
distribution. Ours: `vocab_parallel_logprobs` + `vocab_parallel_entropy`. Each variant runs in
fresh processes; the figure is rank 0's peak resident memory above what it held before the
computation (ru_maxrss), and the wall time, taking the worse of the two ranks. Run: python benchmarks/bench_logprobs.py
"""

import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_mgrpo.parallel.ports import free_port  # noqa: E402

TOKENS, VOCAB, PADDED = 2048, 151_646, 151_936


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(rank: int, world: int, port: int, variant: str, results) -> None:
    from megatron.core import parallel_state

    from megatron_mgrpo.algo import entropy_from_logits
    from megatron_mgrpo.parallel.dist import Launch, destroy_distributed, init_distributed
    from megatron_mgrpo.train.logprobs import vocab_parallel_logprobs_and_entropy

    init_distributed(tp=world, launch=Launch(rank, world, rank, "127.0.0.1", port))
    try:
        g = torch.Generator().manual_seed(rank)
        local = torch.randn(TOKENS, PADDED // world, generator=g)
        targets = torch.randint(0, VOCAB, (TOKENS,), generator=torch.Generator().manual_seed(0))
        dist.barrier()
        before, start = peak_mb(), time.perf_counter()
        if variant == "naive":
            parts = [torch.empty_like(local) for _ in range(world)]
            dist.all_gather(parts, local, group=parallel_state.get_tensor_model_parallel_group())
            full = torch.cat(parts, dim=-1)[:, :VOCAB]
            logprobs = torch.log_softmax(full, -1).gather(-1, targets[:, None]).squeeze(-1)
            entropy = entropy_from_logits(full)
        else:
            logprobs, entropy = vocab_parallel_logprobs_and_entropy(local, targets, VOCAB)
        elapsed = time.perf_counter() - start
        results[(variant, rank)] = (peak_mb() - before, elapsed, float(logprobs.sum() + entropy.sum()))
    finally:
        destroy_distributed()


def main() -> None:
    manager = mp.Manager()
    results = manager.dict()
    for variant in ("naive", "vocab_parallel"):
        mp.start_processes(run, args=(2, free_port(), variant, results), nprocs=2, start_method="spawn")
    def worst(variant):  # the rank that needed the most memory and time (rank 1 also masks the padding)
        runs = [results[(variant, rank)] for rank in range(2)]
        return max(r[0] for r in runs), max(r[1] for r in runs), runs[0][2]

    (naive_mb, naive_s, naive_sum), (ours_mb, ours_s, ours_sum) = worst("naive"), worst("vocab_parallel")
    print(f"TP=2, {TOKENS} tokens x {PADDED} padded vocabulary, fp32; logits per rank "
          f"{TOKENS * PADDED // 2 * 4 / 2**20:.0f} MB")
    print(f"naive (gather full logits): peak +{naive_mb:7.0f} MB  {naive_s * 1000:6.0f} ms")
    print(f"vocab-parallel:             peak +{ours_mb:7.0f} MB  {ours_s * 1000:6.0f} ms")
    print(f"same results: {abs(naive_sum - ours_sum) / abs(naive_sum) < 1e-4}")
    print(f"memory vocab-parallel / naive: {ours_mb / naive_mb:.2f}x; time: {ours_s / naive_s:.2f}x")


if __name__ == "__main__":
    main()
