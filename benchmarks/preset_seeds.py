"""The embedded default (`mgrpo train`, no --config) over several seeds: M-GRPO, SRT and gold labels.

Each run is the preset plus `reward.label_source` and `train.seed` (which also seeds the warm
start, shared by the three methods of a seed). Prints initial -> final true accuracy per run,
mean ± standard error per method, and each label-free method's final accuracy paired by seed
against SRT; runs go to `runs/preset/<method>-s<seed>` and finished ones are not run again.

    python benchmarks/preset_seeds.py [--seeds 0 1 2] [--jobs 2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

RUNS = Path("runs/preset")
METHODS = ("mgrpo", "srt", "gt")


def run(method: str, seed: int, threads: int) -> dict:
    out = RUNS / f"{method}-s{seed}"
    if not (out / "summary.json").exists():
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "train.log", "w") as log:
            subprocess.run([sys.executable, "-m", "megatron_mgrpo.cli", "train", "--out", str(out),
                            f"reward.label_source={method}", f"train.seed={seed}", "log.wandb=disabled"],
                           stdout=log, stderr=subprocess.STDOUT, check=True,
                           env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return json.loads((out / "summary.json").read_text())


def mean_se(values: list[float]) -> str:
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return f"{statistics.fmean(values):+.3f} ± {se:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    jobs = [(method, seed) for seed in args.seeds for method in METHODS]  # a seed's warm start is made once
    with ThreadPoolExecutor(args.jobs) as pool:
        summaries = dict(zip(jobs, pool.map(lambda job: run(*job, threads), jobs)))
    print("| method | " + " | ".join(f"seed {s}: initial -> final" for s in args.seeds)
          + " | final - initial, mean ± s.e. | wall s |")
    print("| --- |" + " --- |" * (len(args.seeds) + 2))
    for method in METHODS:
        runs = [summaries[(method, seed)] for seed in args.seeds]
        cells = [f"{r['initial_true_accuracy']:.3f} -> {r['final_true_accuracy']:.3f}" for r in runs]
        changes = [r["final_true_accuracy"] - r["initial_true_accuracy"] for r in runs]
        walls = [r["wall_seconds"] for r in runs]
        print(f"| {method} | {' | '.join(cells)} | {mean_se(changes)} | {min(walls):.0f}-{max(walls):.0f} |")
    for method in ("mgrpo", "gt"):
        diffs = [summaries[(method, s)]["final_true_accuracy"] - summaries[("srt", s)]["final_true_accuracy"]
                 for s in args.seeds]
        print(f"{method} - srt, final accuracy paired by seed: {' '.join(f'{d:+.3f}' for d in diffs)} "
              f"(mean {mean_se(diffs)})")


if __name__ == "__main__":
    main()
