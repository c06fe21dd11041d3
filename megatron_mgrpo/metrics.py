"""The run's metrics: live progress, metrics.jsonl, wandb, TensorBoard, phase timing, the summary table.

Only the process that owns the run directory (global rank 0) creates a `MetricsSink`; the others
time their phases with a `PhaseTimer` and send what they measured to rank 0.

Metric names are flat, slash-separated keys. The plots (`plots.py`) and the collapse alarm
(`collapse_alarm.py`) read these:

    reward/mean            mean reward of the trained policy responses
    label/accuracy         pseudo-label accuracy against gold (monitoring only)
    label/agreement        fraction of prompts where the policy-only and momentum-only votes agree
    label/share_mean       mean vote share of the winning answer
    accuracy/true          pass@1 of the policy on the eval split (monitoring only), on the steps that evaluate
    accuracy/true_momentum the same for the momentum model (M-GRPO)
    entropy/mean           mean over the policy responses of their mean token entropy
    iqr/drop_rate          fraction of trajectories the IQR filter dropped
    kl/mean                mean KL estimate to the reference
    anchor/flip_rate       share of prompts whose label differs from the policy-only vote (M-GRPO)
    anchor/kl              KL(policy || momentum) per token on the policy's samples
    anchor/distance[_initial]  ||theta - theta_momentum|| (and ||theta - theta_0||)
    vote/<who>_correct     share of prompts whose policy-only / momentum-only vote, or label, is gold
    iqr/<dropped|kept>_<reward|correct>  what the IQR filter dropped and kept (monitoring)
    response/length_mean   mean response length in tokens
    time/<phase>           seconds spent in each phase of the step (PhaseTimer)
    time/step, perf/tokens_per_s

Keys that a run does not log are simply absent from its plots.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
STEP_TIME, OTHER_TIME = "time/step", "time/other"


# --------------------------------------------------------------------------------------------
# timing


class PhaseTimer:
    """Seconds per phase within one step; `take()` returns them and starts the next step.

    Phases may repeat within a step (several micro-batches): their seconds add up. The wall time
    since the last `take()` (or since construction) is reported too, and what the phases did not
    cover as `time/other`, so the stacked step-time plot adds up to the real step time. Call
    `take()` once before the first step to leave set-up time out of it.
    """

    def __init__(self):
        self._seconds: dict[str, float] = {}
        self._step_start = time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self._seconds[name] = self._seconds.get(name, 0.0) + time.perf_counter() - start

    def take(self, tokens: int | None = None) -> dict[str, float]:
        """time/<phase>, time/other, time/step and, given the step's generated tokens, tokens/s."""
        now = time.perf_counter()
        wall = now - self._step_start
        out = {f"time/{name}": seconds for name, seconds in self._seconds.items()}
        out[OTHER_TIME] = max(0.0, wall - sum(self._seconds.values()))
        out[STEP_TIME] = wall
        if tokens is not None and wall > 0:
            out["perf/tokens_per_s"] = tokens / wall
        self._seconds, self._step_start = {}, now
        return out


# --------------------------------------------------------------------------------------------
# metrics.jsonl


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The step records of a metrics.jsonl (or of the run directory holding one).

    A last line cut off by a killed process is not valid JSON and is dropped.
    """
    path = Path(path)
    path = path / METRICS_FILE if path.is_dir() else path
    if not path.exists():
        return []
    records = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            with contextlib.suppress(json.JSONDecodeError):
                records.append(json.loads(line))
    return records


def truncate_metrics(path: Path, resume_step: int) -> list[dict[str, Any]]:
    """Keep only records of steps before `resume_step`, so a resumed run never logs a step twice;
    returns the records kept."""
    kept = [r for r in read_metrics(path) if r.get("step", math.inf) < resume_step]
    staging = path.with_suffix(".jsonl.tmp")
    with open(staging, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(staging, path)
    return kept


# --------------------------------------------------------------------------------------------
# the sink


class MetricsSink:
    """Progress display, metrics.jsonl, wandb and (optionally) TensorBoard for one run directory.

    `start_step` is the first step this process will log (0 for a fresh run, the checkpoint's
    step on resume); records at or after it are removed from metrics.jsonl first. wandb runs
    in `wandb_mode` (offline by default: files under <run_dir>/wandb, no network; `wandb sync`
    uploads them later), with a run id kept in the run directory so a resumed run continues
    the same wandb run.

    `tensorboard` also writes the numeric metrics to event files under <run_dir>/tensorboard, for
    clusters that browse runs with TensorBoard rather than wandb. A resumed run purges the events at
    or after `start_step`, as metrics.jsonl drops its records, so no step shows twice.

    `live` shows progress on `console` (stderr by default): on a terminal a live bar; otherwise
    (Slurm, nohup, a pipe) one line per logged step, flushed at once, since a bar redrawn in
    place only reaches a log file as one line when the run ends.
    """

    def __init__(self, run_dir: str | Path, total_steps: int, *, start_step: int = 0, wandb_mode: str = "offline",
                 wandb_project: str = "megatron_mgrpo", config: Mapping[str, Any] | None = None,
                 live: bool = True, console=None, tensorboard: bool = False):
        from rich.console import Console

        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        # every record of the run so far, e.g. for collapse_alarm
        self.history = truncate_metrics(self.path, start_step) if self.path.exists() else []
        self._wandb = self._start_wandb(wandb_mode, wandb_project, config)
        self._tensorboard = self._start_tensorboard(start_step) if tensorboard else None
        self._file = open(self.path, "a", encoding="utf-8")
        self.console = console or Console(stderr=True)
        self.timer = PhaseTimer()
        self.total_steps = total_steps
        self._progress = self._start_progress(total_steps, start_step) if live and self.console.is_terminal else None
        self._step_lines = live and not self.console.is_terminal

    def _start_progress(self, total_steps: int, start_step: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        progress = Progress(TextColumn("[bold]{task.fields[phase]:<10}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[last]}"),
                            console=self.console)
        progress.start()
        self._task = progress.add_task("steps", total=total_steps, completed=start_step, phase="start", last="")
        return progress

    def _start_tensorboard(self, start_step: int):
        """A SummaryWriter on <run_dir>/tensorboard; imported only here, since most runs do without it.

        A missing package is a ConfigError, so `mgrpo train` reports it in one line, not a traceback.
        """
        from megatron_mgrpo.config import ConfigError

        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("log.tensorboard=true needs the tensorboard package: pip install tensorboard, "
                              "or set log.tensorboard=false") from None
        return SummaryWriter(log_dir=str(self.run_dir / TENSORBOARD_DIR), purge_step=start_step or None)

    def _start_wandb(self, mode: str, project: str, config: Mapping[str, Any] | None):
        if mode not in ("disabled", "offline", "online"):
            raise ValueError(f"log.wandb={mode!r} is not one of disabled, offline, online")
        if mode == "disabled":
            return None
        import wandb

        id_file = self.run_dir / "wandb_id"
        if not id_file.exists():
            id_file.write_text(uuid.uuid4().hex[:12])
        return wandb.init(mode=mode, project=project, dir=str(self.run_dir), id=id_file.read_text().strip(),
                          name=self.run_dir.name, config=dict(config or {}), resume="allow",
                          settings=wandb.Settings(console="off", silent=True))

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a phase of the current step and show it in the progress display."""
        if self._progress is not None:
            self._progress.update(self._task, phase=name)
        with self.timer.phase(name):
            yield

    def log(self, step: int, metrics: Mapping[str, Any], tokens: int | None = None) -> dict[str, Any]:
        """Record step `step` (counted from 0): the metrics plus the step's phase times; returns the record.

        `tokens` (generated this step) adds perf/tokens_per_s. Values are numbers, None for "not
        measured this step", or strings; wandb and TensorBoard get the numbers.
        """
        record = {"step": step, **metrics, **self.timer.take(tokens)}
        self._file.write(json.dumps(record, default=float) + "\n")
        self._file.flush()
        self.history.append(record)
        numbers = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)
        if self._tensorboard is not None:
            for key, value in numbers.items():
                self._tensorboard.add_scalar(key, value, global_step=step)
            self._tensorboard.flush()  # readable while the run goes on, like metrics.jsonl
        if self._progress is not None:
            self._progress.update(self._task, completed=step + 1, phase="step", last=_headline(record))
        if self._step_lines:
            self.console.print(step_line(record, self.total_steps), markup=False, highlight=False, soft_wrap=True)
            self.console.file.flush()
        return record

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        self._file.close()

    def __enter__(self) -> MetricsSink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _headline(record: Mapping[str, Any]) -> str:
    """The few numbers worth reading while a run goes by."""
    shown = (("reward/mean", "reward"), ("accuracy/true", "acc"), ("entropy/mean", "H"), (STEP_TIME, "s/step"))
    return "  ".join(f"{label} {record[key]:.3g}" for key, label in shown if isinstance(record.get(key), (int, float)))


def step_line(record: Mapping[str, Any], total_steps: int) -> str:
    """One step as a log line: `step 3/40  rollout 1.2s train 0.8s (2.3s)  reward 0.41  label share 0.72
    acc 0.55  H 0.83`, with `ALARM` when the collapse alarm fired; what was not measured is left out."""
    phases = " ".join(f"{key.split('/', 1)[1]} {value:.1f}s" for key, value in record.items()
                      if key.startswith("time/") and key not in (STEP_TIME, OTHER_TIME) and is_number(value))
    parts = [f"step {record['step'] + 1}/{total_steps}"]
    if is_number(record.get(STEP_TIME)):
        parts.append(f"{phases} ({record[STEP_TIME]:.1f}s)" if phases else f"{record[STEP_TIME]:.1f}s")
    shown = (("reward/mean", "reward"), ("label/share_mean", "label share"), ("accuracy/true", "acc"),
             ("entropy/mean", "H"))
    parts += [f"{label} {record[key]:.3g}" for key, label in shown if is_number(record.get(key))]
    if record.get("alarm/collapse"):
        parts.append("ALARM")
    return "  ".join(parts)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def summary_table(summary: Mapping[str, Any], title: str = "Run summary"):
    """A two-column rich table of a run's summary (numbers at 4 significant digits)."""
    from rich.table import Table

    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    for key, value in summary.items():
        if key == "splits":  # the fingerprints and sources stay in summary.json
            sizes, shared = value["sizes"], sum(value["overlap"].values())
            key = "questions (rl / warm start / eval)"
            value = f"{' / '.join(map(str, sizes.values()))}, {shared} shared"
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    return table


def print_summary(summary: Mapping[str, Any], console=None) -> None:
    from rich.console import Console

    (console or Console()).print(summary_table(summary))
