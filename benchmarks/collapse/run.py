"""The collapse experiment: SRT vs M-GRPO vs M-GRPO without IQR vs gold-label GRPO, long horizon.

Self-rewarding RL (a majority vote over the policy's own answers as the reward) can reinforce its
own mistakes until its answers agree and are wrong. This runs the four methods on the tiny
built-in task at a learning rate high enough for that to happen, several seeds each (SRT and
gold labels also without the KL penalty, for the collapse alarm's drift signal), and writes
`collapse.png` and `RESULTS.md` next to this file. Runs go to `runs/<method>-s<seed>` as
subprocesses, at most `--jobs` at a time; a run whose summary.json exists is not run again, so an
interrupted experiment resumes where it stopped.

    python benchmarks/collapse/run.py [--seeds 1 2 3] [--jobs 2] [--report-only]

The settings are in `config.yaml` (the CPU preset, frozen, with the experiment's changes).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from alarm_replay import replay  # noqa: E402  (this directory, on the path when run as a script)
from megatron_mgrpo.metrics import read_metrics  # noqa: E402

HERE = Path(__file__).resolve().parent
RUNS = HERE / "runs"
CONFIG = HERE / "config.yaml"
NOTES_MARKER = "<!-- notes: kept when the script rewrites this file -->"

# method name -> the overrides that select it (everything else is shared)
METHODS = {
    "srt": ["reward.label_source=srt"],
    "mgrpo": ["reward.label_source=mgrpo"],
    "mgrpo-no-iqr": ["reward.label_source=mgrpo", "algo.iqr_filter=false"],
    "gt": ["reward.label_source=gt"],
    # without the KL penalty (its drift is still logged, log.drift): does the alarm still tell them apart?
    "srt-kl0": ["reward.label_source=srt", "algo.kl_coef=0"],
    "gt-kl0": ["reward.label_source=gt", "algo.kl_coef=0"],
}


def command(method: str, seed: int) -> list[str]:
    """The training command of one run; a seed is train.seed (it also seeds the warm start)."""
    return [sys.executable, "-m", "megatron_mgrpo.cli", "train", "--config", str(CONFIG),
            "--out", str(RUNS / f"{method}-s{seed}"), *METHODS[method], f"train.seed={seed}"]


def run_one(method: str, seed: int, threads: int) -> str:
    """Train one (method, seed) on `threads` intra-op threads unless it already finished; its
    console output goes to train.log."""
    out = RUNS / f"{method}-s{seed}"
    if (out / "summary.json").exists():
        return f"{out.name}: done before, skipped"
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with open(out / "train.log", "w") as log:
        rc = subprocess.run(command(method, seed), stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": str(threads)}).returncode
    return f"{out.name}: exit {rc} after {time.time() - started:.0f} s"


def run_all(args) -> None:
    """All runs, `--jobs` at a time, sharing the cores (more OpenMP threads than cores would make
    every run wait on the others'). Method by method, so that the runs of a seed, which share its
    cached warm start, do not start together and each compute it."""
    jobs = [(method, seed) for method in METHODS for seed in args.seeds]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    with ThreadPoolExecutor(args.jobs) as pool:
        for message in pool.map(lambda job: run_one(*job, threads), jobs):
            print(message, flush=True)


# ------------------------------------------------------------------------------------ results


def load(method: str, seeds: list[int]) -> list[dict]:
    """The finished runs of a method: summary plus metric records."""
    runs = []
    for seed in seeds:
        out = RUNS / f"{method}-s{seed}"
        if (out / "summary.json").exists():
            runs.append({"seed": seed, "summary": json.loads((out / "summary.json").read_text()),
                         "records": read_metrics(out)})
    return runs


def curve(runs: list[dict], key: str, initial: bool = False) -> tuple[list[int], list[list[float]]]:
    """Steps where every run logged `key`, and the values of each run there. With `initial`, the
    accuracy measured before the first step is put at step 0."""
    per_run = []
    for run in runs:
        points = {r["step"] + 1: r[key] for r in run["records"] if isinstance(r.get(key), (int, float))}
        if initial:
            points[0] = run["summary"]["initial_true_accuracy"]
        per_run.append(points)
    steps = sorted(set.intersection(*(set(p) for p in per_run)))
    return steps, [[p[s] for p in per_run] for s in steps]


def smooth(values: list[float], window: int = 10) -> list[float]:
    """Trailing mean: per-step training signals are noisy with 8 prompts a step."""
    return [statistics.fmean(values[max(0, i - window + 1):i + 1]) for i in range(len(values))]


def plot(results: dict[str, list[dict]], path: Path) -> None:
    """True accuracy (absolute, and relative to each seed's warm start, which differs by seed),
    pseudo-label accuracy and entropy vs step: mean over seeds with a min-max band."""
    # (key, title, step 0 = initial accuracy, minus the seed's initial accuracy, smoothed)
    panels = [("accuracy/true", "true accuracy (held-out pass@1)", True, False, False),
              ("accuracy/true", "true accuracy minus the seed's initial accuracy", True, True, False),
              ("label/accuracy", "pseudo-label accuracy vs gold (10-step mean)", False, False, True),
              ("entropy/mean", "policy entropy, nats/token (10-step mean)", False, False, True)]
    figure, axes = plt.subplots(2, 2, figsize=(13, 8), layout="constrained")
    for ax, (key, title, initial, relative, smoothed) in zip(axes.flat, panels):
        for color, (method, runs) in enumerate(results.items()):  # a method keeps its colour in every panel
            if not runs or (key == "label/accuracy" and method.startswith("gt")):
                continue
            steps, values = curve(runs, key, initial)
            columns = [[v - c[0] if relative else v for v in c] for c in zip(*values)]
            rows = list(zip(*[smooth(c) if smoothed else c for c in columns]))
            ax.plot(steps, [statistics.fmean(r) for r in rows], label=method, color=f"C{color}")
            ax.fill_between(steps, [min(r) for r in rows], [max(r) for r in rows], alpha=0.2, color=f"C{color}")
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
    axes[0, 0].legend()
    figure.savefig(path, dpi=100)


def spread(values: list[float], signed: bool = False) -> str:
    """mean (min to max) over seeds."""
    if not values:
        return "-"
    f = "+.3f" if signed else ".3f"
    return f"{statistics.fmean(values):{f}} ({min(values):{f}} to {max(values):{f}})"


def table(results: dict[str, list[dict]]) -> list[str]:
    """One row per method: accuracies as mean (min to max) over seeds."""
    return ["| method | seeds | initial acc. | best acc. during RL | final acc. | final - initial | final pseudo-label acc. | "
            "final vote share | final entropy | alarm fired (runs; first step) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            *[row(method, runs) for method, runs in results.items()]]


def row(method: str, runs: list[dict]) -> str:
    """Accuracies from summary.json; label-free signals averaged over each run's last 10 steps,
    since one step's 8 prompts make them noisy."""
    summaries = [r["summary"] for r in runs]

    def accuracy(key):
        return spread([s[key] for s in summaries])

    def final(key):
        tails = [[x[key] for x in r["records"][-10:] if isinstance(x.get(key), (int, float))] for r in runs]
        return spread([statistics.fmean(t) for t in tails if t])

    change = spread([s["final_true_accuracy"] - s["initial_true_accuracy"] for s in summaries], signed=True)
    labels = "gold | gold" if method.startswith("gt") else f"{final('label/accuracy')} | {final('label/share_mean')}"
    firsts = [replay(r["records"])[0] for r in runs]  # today's rule, also over runs recorded before it changed
    fired = [step for step in firsts if step is not None]
    return (f"| {method} | {len(runs)} | {accuracy('initial_true_accuracy')} | {accuracy('best_true_accuracy')} | "
            f"{accuracy('final_true_accuracy')} | {change} | {labels} | {final('entropy/mean')} | "
            f"{len(fired)}/{len(runs)}; {', '.join(map(str, fired)) or '-'} |")


def machine() -> str:
    import torch

    return (f"{platform.node()} ({platform.system()} {platform.machine()}, {os.cpu_count()} cores), "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def write_report(results: dict[str, list[dict]], args, path: Path) -> None:
    """RESULTS.md: settings, table and per-run wall time; the notes after NOTES_MARKER are kept."""
    old = path.read_text() if path.exists() else ""
    notes = old.split(NOTES_MARKER, 1)[1] if NOTES_MARKER in old else "\n"
    walls = [r["summary"]["wall_seconds"] for runs in results.values() for r in runs]
    missing = [f"{m}-s{s}" for m in METHODS for s in args.seeds if s not in [r["seed"] for r in results[m]]]
    example = shlex.join(["python", *command("mgrpo", args.seeds[0])[1:]]).replace(str(HERE), "benchmarks/collapse")
    lines = [
        "# Collapse experiment: SRT vs M-GRPO vs M-GRPO without IQR vs gold-label GRPO", "",
        f"Generated by `python benchmarks/collapse/run.py --seeds {' '.join(map(str, args.seeds))} "
        f"--jobs {args.jobs}` on {datetime.date.today().isoformat()}, {machine()}.", "",
        "Every run trains with [`config.yaml`](config.yaml) plus the method and `train.seed`, e.g.", "",
        "```bash", example, "```", "",
        "```", *[f"{m}: {' '.join(o)}" for m, o in METHODS.items()], "```", "",
        "```yaml", CONFIG.read_text().rstrip(), "```", "",
        "True accuracy is pass@1 on 128 held-out prompts, 4 samples each at temperature 1.0, every "
        "10 steps and before the first step (gold answers are used only to measure it). Values are "
        "mean (min to max) over seeds; the pseudo-label accuracy, vote share and entropy columns are "
        "means over each run's last 10 steps. The alarm is `megatron_mgrpo.metrics.collapse_alarm`, replayed "
        "step by step over each run's records (`alarm_replay.py`).", "",
        *table(results), "",
        f"Runs missing: {', '.join(missing) if missing else 'none'}. Wall time per run: "
        f"{min(walls, default=0):.0f}-{max(walls, default=0):.0f} s ({args.jobs} runs at a time).", "",
        "![collapse](collapse.png)", "", NOTES_MARKER + notes.rstrip("\n") + "\n"]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--report-only", action="store_true", help="only redraw the plot and RESULTS.md")
    args = parser.parse_args()
    if not args.report_only:
        run_all(args)
    results = {method: load(method, args.seeds) for method in METHODS}
    plot(results, HERE / "collapse.png")
    write_report(results, args, HERE / "RESULTS.md")


if __name__ == "__main__":
    main()
