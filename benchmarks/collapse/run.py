"""The collapse study: when does M-GRPO hold where self-rewarding (SRT) collapses?

Every run trains the tiny built-in model on the small_sums task from its seed's warm start, with
[`config.yaml`](config.yaml) plus one variant's overrides and `train.seed`. Training, warm-start and
evaluation questions are disjoint splits (checked by question text, recorded in each summary.json).
Variants are chosen on the selection seeds 0-4; the chosen M-GRPO variant, SRT and gold labels are
then confirmed on seeds 5-9, which played no part in the choice. Runs go to `runs/<variant>-s<seed>`
as subprocesses, `--jobs` at a time; a finished run is not run again, so an interrupted study
resumes where it stopped. Writes `RESULTS.md` (tables, paired differences, diagnostics) and the plots
`accuracy.png` and `anchor.png` next to this file.

    python benchmarks/collapse/run.py select      # seeds 0-4, every variant
    python benchmarks/collapse/run.py confirm     # seeds 5-9: srt, gt and the chosen variant
    python benchmarks/collapse/run.py report      # tables and plots from what has finished
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from megatron_mgrpo.metrics import read_metrics  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout's tools/
from tools.alarm_replay import replay  # noqa: E402

HERE = Path(__file__).resolve().parent
RUNS = HERE / "runs"
CONFIG = HERE / "config.yaml"
NOTES_MARKER = "<!-- notes: kept when the script rewrites this file -->"
SELECTION_SEEDS, CONFIRMATION_SEEDS = list(range(5)), list(range(5, 10))
LOW_LR = "train.lr=0.00003"

# variant -> the overrides that select it (everything else is config.yaml)
VARIANTS = {
    "srt": ["reward.label_source=srt"],
    "gt": ["reward.label_source=gt"],
    "mgrpo": ["reward.label_source=mgrpo"],  # N/G = 4/16, m = 0.99: the paper's ratio and momentum
    "mgrpo-no-iqr": ["reward.label_source=mgrpo", "algo.iqr_filter=false"],
    "mgrpo-n8": ["reward.label_source=mgrpo", "rollout.momentum_samples=8"],  # N/G = 0.5
    "mgrpo-m999": ["reward.label_source=mgrpo", "algo.momentum=0.999"],
    "mgrpo-cosine": ["reward.label_source=mgrpo", "algo.momentum_schedule=cosine", "algo.momentum_final=0.99999"],
    "mgrpo-momvote": ["reward.label_source=mgrpo", "reward.vote_pool=momentum"],
    "srt-lowlr": ["reward.label_source=srt", LOW_LR],
    "mgrpo-lowlr": ["reward.label_source=mgrpo", LOW_LR],
}
COLLAPSED, HELD = 0.10, 0.02  # final <= best - 10 points: collapsed; final >= best - 2 points: held


def command(variant: str, seed: int) -> list[str]:
    return [sys.executable, "-m", "megatron_mgrpo.cli", "train", "--config", str(CONFIG),
            "--out", str(RUNS / f"{variant}-s{seed}"), *VARIANTS[variant], f"train.seed={seed}"]


def run_one(variant: str, seed: int, threads: int) -> str:
    """Train one (variant, seed) unless it already finished; its console output goes to train.log."""
    out = RUNS / f"{variant}-s{seed}"
    if (out / "summary.json").exists():
        return f"{out.name}: done before, skipped"
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with open(out / "train.log", "w") as log:
        rc = subprocess.run(command(variant, seed), stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": str(threads)}).returncode
    return f"{out.name}: exit {rc} after {time.time() - started:.0f} s"


def run_all(jobs: list[tuple[str, int]], workers: int) -> None:
    """`workers` runs at a time, sharing the cores. A seed's warm start is made by the first of its
    runs and cached for the rest: runs of a seed without one must not start together."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ThreadPoolExecutor(workers) as pool:
        for message in pool.map(lambda job: run_one(*job, threads), jobs):
            print(message, flush=True)


# ------------------------------------------------------------------------------------ results


def load(variant: str, seeds: list[int]) -> dict[int, dict]:
    """seed -> summary and metric records of the finished runs of a variant."""
    runs = {}
    for seed in seeds:
        out = RUNS / f"{variant}-s{seed}"
        if (out / "summary.json").exists():
            runs[seed] = {"summary": json.loads((out / "summary.json").read_text()), "records": read_metrics(out)}
    return runs


def mean_se(values: list[float], signed: bool = False) -> str:
    """mean +- standard error over seeds."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "-"
    f = "+.3f" if signed else ".3f"
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return f"{statistics.fmean(values):{f}} ± {se:.3f}"


def tail_mean(run: dict, key: str, steps: int = 20) -> float:
    values = [r[key] for r in run["records"][-steps:] if isinstance(r.get(key), (int, float))]
    return statistics.fmean(values) if values else math.nan


def whole_mean(run: dict, key: str) -> float:
    values = [r[key] for r in run["records"] if isinstance(r.get(key), (int, float))]
    return statistics.fmean(values) if values else math.nan


def best(summary: dict) -> float:
    """The best true accuracy of a run, the warm start's included (a run that only falls from its
    start has its best at step 0)."""
    return max(summary["initial_true_accuracy"], summary["best_true_accuracy"])


def accuracy_row(variant: str, runs: dict[int, dict]) -> str:
    s = {seed: run["summary"] for seed, run in runs.items()}
    drop = [x["final_true_accuracy"] - best(x) for x in s.values()]
    collapsed = sum(d <= -COLLAPSED for d in drop)
    held = sum(d >= -HELD for d in drop)
    alarms = sum(replay(run["records"])[0] is not None for run in runs.values())
    return (f"| {variant} | {len(runs)} | {mean_se([x['initial_true_accuracy'] for x in s.values()])} | "
            f"{mean_se([best(x) for x in s.values()])} | "
            f"{mean_se([x['final_true_accuracy'] for x in s.values()])} | {mean_se(drop, True)} | "
            f"{mean_se([x['final_true_accuracy'] - x['initial_true_accuracy'] for x in s.values()], True)} | "
            f"{collapsed} / {held} | {alarms} |")


def accuracy_table(results: dict[str, dict[int, dict]]) -> list[str]:
    return ["| variant | seeds | initial (warm start) | best (initial included) | final | final - best | "
            "final - initial | collapsed / held | alarm fired |", "|" + " --- |" * 9,
            *[accuracy_row(v, runs) for v, runs in results.items() if runs]]


def paired_table(results: dict[str, dict[int, dict]], baseline_of) -> list[str]:
    """Per variant: its final accuracy minus its baseline's, seed by seed (same warm start)."""
    lines = ["| variant | paired with | seeds | final - baseline's final, per seed | mean ± s.e. | variant better in |",
             "|" + " --- |" * 6]
    for variant, runs in results.items():
        baseline = baseline_of(variant)
        base = results.get(baseline, {})
        seeds = sorted(set(runs) & set(base))
        if not seeds:
            continue
        diffs = [runs[s]["summary"]["final_true_accuracy"] - base[s]["summary"]["final_true_accuracy"] for s in seeds]
        lines.append(f"| {variant} | {baseline} | {len(seeds)} | {' '.join(f'{d:+.3f}' for d in diffs)} | "
                     f"{mean_se(diffs, True)} | {sum(d > 0 for d in diffs)}/{len(diffs)} |")
    return lines


def same_rate_srt(variant: str) -> str | None:
    """SRT at the variant's learning rate."""
    baseline = "srt-lowlr" if variant.endswith("-lowlr") else "srt"
    return None if variant == baseline else baseline


def paper_mgrpo(variant: str) -> str | None:
    """The paper's M-GRPO (N/G = 1/4, m = 0.99, IQR filter), for the variants that change one thing of it."""
    return "mgrpo" if variant.startswith("mgrpo-") and not variant.endswith("-lowlr") else None


def diagnostics_table(results: dict[str, dict[int, dict]]) -> list[str]:
    """The anchor and filter diagnostics, means over each run's steps (then mean ± s.e. over seeds)."""
    columns = [("anchor/flip_rate", "flip rate", whole_mean), ("label/agreement", "policy-momentum vote agreement",
                                                                  whole_mean),
               ("vote/policy_correct", "policy vote = gold", whole_mean),
               ("vote/momentum_correct", "momentum vote = gold", whole_mean),
               ("vote/label_correct", "label = gold", whole_mean),
               ("anchor/kl", "KL(policy ‖ momentum), last 20 steps", tail_mean),
               ("distance_ratio", "‖θ-θ_m‖ / ‖θ-θ_0‖, last 20 steps", tail_mean),
               ("iqr/dropped_correct", "dropped: correct", whole_mean),
               ("iqr/kept_correct", "kept: correct", whole_mean),
               ("iqr/dropped_reward", "dropped: reward", whole_mean), ("iqr/kept_reward", "kept: reward", whole_mean),
               ("final_momentum_true_accuracy", "momentum model's final acc.", None)]
    lines = ["| variant | " + " | ".join(title for _, title, _ in columns) + " |",
             "| --- |" + " --- |" * len(columns)]
    for variant, runs in results.items():
        if not runs or not variant.startswith("mgrpo"):
            continue
        cells = []
        for key, _, reduce in columns:
            if reduce is None:
                values = [run["summary"].get(key) for run in runs.values()]
            else:
                values = [reduce(run, key) for run in runs.values()]
            cells.append(mean_se(values))
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return lines


def with_distance_ratio(runs: dict[int, dict]) -> None:
    for run in runs.values():
        for r in run["records"]:
            if r.get("anchor/distance_initial"):
                r["distance_ratio"] = r["anchor/distance"] / r["anchor/distance_initial"]


def curve(runs: dict[int, dict], key: str, initial: bool = False) -> tuple[list[int], list[list[float]]]:
    """Steps where every run logged `key`, and each run's value there (step 0: the warm start)."""
    per_run = []
    for run in runs.values():
        points = {r["step"] + 1: r[key] for r in run["records"] if isinstance(r.get(key), (int, float))}
        if initial:
            points[0] = run["summary"]["initial_true_accuracy"]
        per_run.append(points)
    steps = sorted(set.intersection(*(set(p) for p in per_run)))
    return steps, [[p[s] for p in per_run] for s in steps]


def smooth(values: list[float], window: int = 10) -> list[float]:
    return [statistics.fmean(values[max(0, i - window + 1):i + 1]) for i in range(len(values))]


def band_plot(ax, runs: dict[int, dict], key: str, label: str, color: str, initial=False, relative=False,
              smoothed=False) -> None:
    """Mean over seeds with a +- one standard error band."""
    steps, values = curve(runs, key, initial)
    if not steps:
        return
    columns = [[v - c[0] if relative else v for v in c] for c in zip(*values)]  # per run
    rows = list(zip(*[smooth(c) if smoothed else c for c in columns]))  # per step
    means = [statistics.fmean(r) for r in rows]
    ses = [statistics.stdev(r) / math.sqrt(len(r)) if len(r) > 1 else 0.0 for r in rows]
    ax.plot(steps, means, label=label, color=color)
    ax.fill_between(steps, [m - e for m, e in zip(means, ses)], [m + e for m, e in zip(means, ses)], alpha=0.2,
                    color=color)


def plot(results: dict[str, dict[int, dict]], seeds_label: str, path_accuracy: Path, path_anchor: Path) -> None:
    colors = {v: f"C{i}" for i, v in enumerate(VARIANTS)}
    figure, axes = plt.subplots(1, 2, figsize=(14, 5), layout="constrained")
    for variant, runs in results.items():
        if runs:
            band_plot(axes[0], runs, "accuracy/true", variant, colors[variant], initial=True)
            band_plot(axes[1], runs, "accuracy/true", variant, colors[variant], initial=True, relative=True)
    axes[0].set(title=f"true accuracy (eval split pass@1), mean ± s.e., {seeds_label}", xlabel="step")
    axes[1].set(title="true accuracy minus the seed's warm start", xlabel="step")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.savefig(path_accuracy, dpi=90)
    figure, axes = plt.subplots(2, 2, figsize=(14, 8), layout="constrained")
    panels = [("anchor/flip_rate", "label flip rate (label != policy-only vote), 10-step mean"),
              ("anchor/kl", "KL(policy ‖ momentum) per token on policy samples, 10-step mean"),
              ("distance_ratio", "‖θ - θ_momentum‖ / ‖θ - θ_0‖, 10-step mean"),
              ("accuracy/true_momentum", "momentum model's true accuracy")]
    for ax, (key, title) in zip(axes.flat, panels):
        for variant, runs in results.items():
            if runs and variant.startswith("mgrpo"):
                band_plot(ax, runs, key, variant, colors[variant], smoothed=key != "accuracy/true_momentum")
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    figure.savefig(path_anchor, dpi=90)


def machine() -> str:
    import torch

    return (f"{platform.node()} ({platform.system()} {platform.machine()}, {os.cpu_count()} cores), "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def choose(results: dict[str, dict[int, dict]]) -> str:
    """The M-GRPO variant (at the collapsing learning rate) with the highest mean final accuracy on
    the selection seeds: the rule fixed before any run was made."""
    candidates = {v: runs for v, runs in results.items() if v.startswith("mgrpo") and "lowlr" not in v and runs}
    return max(candidates, key=lambda v: statistics.fmean(r["summary"]["final_true_accuracy"]
                                                          for r in candidates[v].values()))


def write_report(path: Path) -> None:
    selection = {v: load(v, SELECTION_SEEDS) for v in VARIANTS}
    confirmation = {v: load(v, CONFIRMATION_SEEDS) for v in VARIANTS}
    for runs in [*selection.values(), *confirmation.values()]:
        with_distance_ratio(runs)
    chosen = choose(selection)
    confirmed = {v: runs for v, runs in confirmation.items() if runs}
    plot(selection, "seeds 0-4", HERE / "accuracy.png", HERE / "anchor.png")
    if confirmed:
        plot(confirmed, "seeds 5-9", HERE / "accuracy_confirmation.png", HERE / "anchor_confirmation.png")
    old = path.read_text() if path.exists() else ""
    notes = old.split(NOTES_MARKER, 1)[1] if NOTES_MARKER in old else "\n"
    walls = [r["summary"]["wall_seconds"] for group in (selection, confirmation) for runs in group.values()
             for r in runs.values()]
    splits = next(r["summary"]["splits"] for runs in selection.values() for r in runs.values())
    lines = [
        "# Collapse study: when does M-GRPO hold where SRT collapses?", "",
        f"Generated by `python benchmarks/collapse/run.py report` on {datetime.date.today().isoformat()}, "
        f"{machine()}; runs made with `select` and `confirm` ({len(walls)} runs, "
        f"{min(walls, default=0):.0f}-{max(walls, default=0):.0f} s each, two at a time, one thread each).", "",
        "Every run trains with [`config.yaml`](config.yaml) plus its variant's overrides and `train.seed` (which "
        "also seeds its warm start; all variants of a seed share it):", "",
        "```", *[f"{v}: {' '.join(o)}" for v, o in VARIANTS.items()], "```", "",
        f"Data (every run, from its summary.json): RL / warm-start / evaluation questions "
        f"{splits['sizes']['rl']} / {splits['sizes']['warmstart']} / {splits['sizes']['eval']}, pairwise overlap "
        f"{splits['overlap']}, fingerprints {splits['fingerprints']}.", "",
        "True accuracy is pass@1 on the evaluation split (256 questions no run trains or warm-starts on), 4 "
        "samples each at T = 1.0, before the first step and every 10 steps. Values are mean ± standard error "
        f"over seeds. Collapsed: final <= best - {COLLAPSED:.2f}; held: final >= best - {HELD:.2f} (counts of "
        "seeds). The alarm column replays `megatron_mgrpo.collapse_alarm` over each run.", "",
        "## Selection seeds 0-4: every variant", "", *accuracy_table(selection), "",
        "Paired by seed against SRT at the same learning rate (same warm start, same questions):", "",
        *paired_table(selection, same_rate_srt), "",
        "Paired by seed against the paper's M-GRPO (what each single change does):", "",
        *paired_table(selection, paper_mgrpo), "",
        "Anchor and filter diagnostics (monitoring only; means over each run's steps unless marked):", "",
        *diagnostics_table(selection), "",
        "![accuracy](accuracy.png)", "", "![anchor](anchor.png)", "",
        f"## Confirmation seeds 5-9: SRT, gold labels and the chosen variant (`{chosen}`)", "",
        f"Chosen on seeds 0-4 by a rule fixed in advance (highest mean final accuracy among the M-GRPO variants "
        f"at the collapsing learning rate): **{chosen}**.", "",
        *(accuracy_table(confirmed) + ["", *paired_table(confirmed, same_rate_srt), "",
                                       *diagnostics_table(confirmed), "",
                                       "![accuracy](accuracy_confirmation.png)", "",
                                       "![anchor](anchor_confirmation.png)"] if confirmed else ["Not run yet."]), "",
        NOTES_MARKER + notes.rstrip("\n") + "\n"]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=("select", "confirm", "report"))
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    if args.stage == "select":
        run_all([("srt", seed) for seed in SELECTION_SEEDS], args.jobs)  # also makes each seed's warm start
        run_all([(v, seed) for seed in SELECTION_SEEDS for v in VARIANTS], args.jobs)
    elif args.stage == "confirm":
        chosen = choose({v: load(v, SELECTION_SEEDS) for v in VARIANTS})
        print(f"chosen on seeds 0-4: {chosen}", flush=True)
        run_all([("srt", seed) for seed in CONFIRMATION_SEEDS], args.jobs)  # also makes each seed's warm start
        run_all([(v, seed) for seed in CONFIRMATION_SEEDS for v in ("gt", chosen)], args.jobs)
    write_report(HERE / "RESULTS.md")


if __name__ == "__main__":
    main()
