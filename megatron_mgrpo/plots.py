"""PNG plots of a run's metrics.jsonl (<run_dir>/plots/): one chart per group of keys, and the
step time stacked by phase."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from megatron_mgrpo.metrics import STEP_TIME, is_number, read_metrics

PLOTS_DIR = "plots"
# (file stem, title, keys drawn as lines, y label)
PLOTS = (
    ("reward", "Reward", ("reward/mean",), "mean reward"),
    ("pseudo_label_accuracy", "Pseudo-label accuracy vs gold", ("label/accuracy",), "accuracy"),
    ("true_accuracy", "True accuracy (eval split)", ("accuracy/true", "accuracy/true_momentum"), "accuracy"),
    ("entropy", "Policy entropy", ("entropy/mean",), "nats / token"),
    ("iqr_drop_rate", "IQR filter drop rate", ("iqr/drop_rate",), "fraction dropped"),
    ("kl", "KL to reference", ("kl/mean",), "KL"),
    ("response_length", "Response length", ("response/length_mean",), "tokens"),
    ("anchor", "Momentum anchor", ("anchor/flip_rate", "anchor/kl", "label/agreement"), "value"),
    ("votes", "Votes equal to gold", ("vote/policy_correct", "vote/momentum_correct", "vote/label_correct"), "share"),
    ("collapse_signals", "Collapse signals", ("label/agreement", "label/share_mean", "kl/mean", "alarm/collapse"),
     "value"),
)


def plot_metrics(run_dir: str | Path) -> list[Path]:
    """PNG plots of <run_dir>/metrics.jsonl into <run_dir>/plots; returns the files written.

    The true accuracy starts at step 0 with the accuracy before training, from <run_dir>/summary.json
    when there is one (the trainer measures it before the first step, which no record holds)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    records = read_metrics(run_dir)
    out_dir = Path(run_dir) / PLOTS_DIR
    out_dir.mkdir(exist_ok=True)
    written = []
    initial = _initial_points(run_dir)
    charts = [(stem, title, _series(records, keys, initial), ylabel, False) for stem, title, keys, ylabel in PLOTS]
    charts.append(("step_time", "Step time by phase", _series(records, _phase_keys(records)), "seconds", True))
    for stem, title, series, ylabel, stacked in charts:
        if not series:
            continue
        figure = Figure(figsize=(6, 3.5), layout="tight")
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        if stacked:
            steps = [step for step, _ in next(iter(series.values()))]
            axes.stackplot(steps, *[[v for _, v in points] for points in series.values()],
                           labels=[k.split("/", 1)[1] for k in series])
        else:
            for key, points in series.items():
                axes.plot(*zip(*points), label=key, marker="." if len(points) < 30 else None)
        axes.set(title=title, xlabel="step", ylabel=ylabel)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
        path = out_dir / f"{stem}.png"
        figure.savefig(path, dpi=100)
        written.append(path)
    return written


def _phase_keys(records: list[dict[str, Any]]) -> tuple[str, ...]:
    """time/<phase> keys logged on every step (stacked areas need a value at each step)."""
    if not records:
        return ()
    common = set.intersection(*(set(r) for r in records))
    return tuple(sorted(k for k in common if k.startswith("time/") and k != STEP_TIME))


def _initial_points(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """`accuracy/true` at step 0 from summary.json's `initial_true_accuracy`, if the run has one."""
    try:
        initial = json.loads((Path(run_dir) / "summary.json").read_text()).get("initial_true_accuracy")
    except (OSError, json.JSONDecodeError):
        return {}
    return {"accuracy/true": [(0, float(initial))]} if is_number(initial) and math.isfinite(initial) else {}


def _series(records: list[dict[str, Any]], keys: Sequence[str],
            first: Mapping[str, list[tuple[int, float]]] | None = None) -> dict[str, list[tuple[int, float]]]:
    """(step, value) points of each key that has at least one finite number, after its `first` points."""
    series = {}
    for key in keys:
        points = list((first or {}).get(key, [])) + [(r["step"], float(r[key])) for r in records
                                                     if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if points:
            series[key] = points
    return series
