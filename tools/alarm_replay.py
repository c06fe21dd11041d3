"""Replay `megatron_mgrpo.collapse_alarm` over the collapse experiment's recorded runs.

For every run in `runs/<method>-s<seed>` this evaluates the alarm at each step on the records up
to that step, as the trainer does, so a changed rule can be checked without training again. It
prints a Markdown table with one row per run:

- the first step where the alarm fires, the signal that fired it, and the true accuracy last
  measured by then;
- how many of the run's steps it was raised on;
- the first step where true accuracy fell below 50% of the run's initial accuracy;
- initial, best and final true accuracy.

Steps are the records' `step` (counted from 0; true accuracy is measured after steps 9, 19, ...).
True accuracy comes from gold answers and is used here only to judge the alarm. The alarm itself
never reads it.

    python tools/alarm_replay.py [RUNS_DIR]   (default: benchmarks/collapse/runs)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from megatron_mgrpo.collapse_alarm import collapse_alarm
from megatron_mgrpo.metrics import read_metrics

RUNS = Path(__file__).resolve().parents[1] / "benchmarks" / "collapse" / "runs"


def replay(records: list[dict]) -> tuple[int | None, str, int]:
    """The first step where the alarm fires, its first reason, and the number of steps it is raised."""
    first, reason, raised = None, "", 0
    for end in range(1, len(records) + 1):
        alarm = collapse_alarm(records[:end])
        if alarm.alarm:
            raised += 1
            if first is None:
                first, reason = records[end - 1]["step"], alarm.reasons[0]
    return first, reason, raised


def row(run_dir: Path) -> str:
    records = read_metrics(run_dir)
    initial = json.loads((run_dir / "summary.json").read_text())["initial_true_accuracy"]
    # (step, true accuracy after it), starting from the accuracy measured before the first step
    evals = [(-1, initial)] + [(r["step"], r["accuracy/true"]) for r in records
                               if isinstance(r.get("accuracy/true"), (int, float))]
    halved = next((step for step, accuracy in evals if accuracy < 0.5 * initial), None)
    first, reason, raised = replay(records)
    if first is None:
        fired, signal, then = "never", "-", "-"
    else:
        fired, then = first, f"{[a for step, a in evals if step <= first][-1]:.3f}"
        signal = "drift (KL)" if reason.startswith("KL") else "anchor split (agreement)"
    during = [a for step, a in evals if step >= 0]
    return (f"| {run_dir.name} | {fired} | {signal} | {then} | {raised}/{len(records)} | "
            f"{'never' if halved is None else halved} | {initial:.3f} | {max(during):.3f} | {during[-1]:.3f} |")


def main(runs_dir: Path = RUNS) -> None:
    runs = sorted((d for d in runs_dir.glob("*-s*") if (d / "summary.json").exists()),
                  key=lambda d: (d.name.rsplit("-s", 1)[0], int(d.name.rsplit("-s", 1)[1])))
    if not runs:
        raise SystemExit(f"no finished runs under {runs_dir}: run benchmarks/collapse/run.py first")
    print("| run | alarm first fires (step) | first signal | true acc. by then | steps raised | "
          "true acc. < 50% of initial (step) | initial acc. | best acc. | final acc. |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for run_dir in runs:
        print(row(run_dir))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else RUNS)
