"""The metrics sink (jsonl, resume, wandb), phase timing, plots, summary and the collapse alarm."""

import json
import re
import time

import pytest

from megatron_mgrpo.collapse_alarm import collapse_alarm
from megatron_mgrpo.metrics import MetricsSink, PhaseTimer, read_metrics, summary_table
from megatron_mgrpo.plots import plot_metrics


def run_steps(run_dir, steps, start=0, **kwargs):
    with MetricsSink(run_dir, total_steps=10, start_step=start, wandb_mode="disabled", live=False, **kwargs) as sink:
        for step in steps:
            with sink.phase("rollout"):
                pass
            sink.log(step, {"reward/mean": step / 10})


def test_one_record_per_step_flushed_as_it_is_logged(tmp_path):
    sink = MetricsSink(tmp_path, total_steps=3, wandb_mode="disabled", live=False)
    sink.log(0, {"reward/mean": 0.5})
    assert read_metrics(tmp_path)[0]["reward/mean"] == 0.5  # readable before close
    sink.log(1, {"reward/mean": 0.25})
    sink.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1]


def test_resume_drops_steps_at_or_after_the_resume_step(tmp_path):
    run_steps(tmp_path, range(5))
    run_steps(tmp_path, range(3, 6), start=3)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 5]
    with MetricsSink(tmp_path, total_steps=10, start_step=4, wandb_mode="disabled", live=False) as sink:
        assert [r["step"] for r in sink.history] == [0, 1, 2, 3]
        sink.log(4, {"reward/mean": 0.0, "note": "text"})
        assert sink.history[-1]["note"] == "text"


def test_a_line_cut_off_by_a_kill_is_dropped_on_resume(tmp_path):
    run_steps(tmp_path, range(2))
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 2, "reward/me')
    run_steps(tmp_path, [2], start=2)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1, 2]


def test_phase_timer_adds_repeated_phases_and_accounts_for_the_rest():
    timer = PhaseTimer()
    for _ in range(2):
        with timer.phase("train"):
            time.sleep(0.02)
    time.sleep(0.02)
    out = timer.take(tokens=100)
    assert out["time/train"] >= 0.04
    assert out["time/other"] >= 0.02
    assert out["time/step"] == pytest.approx(out["time/train"] + out["time/other"])
    assert out["perf/tokens_per_s"] == pytest.approx(100 / out["time/step"])
    assert "time/train" not in timer.take()  # the next step starts empty


@pytest.mark.slow
def test_wandb_offline_writes_inside_the_run_dir_and_resumes_the_same_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # any network attempt would fail
    for start in (0, 1):
        with MetricsSink(tmp_path, total_steps=2, start_step=start, wandb_mode="offline", live=False,
                         config={"algo": {"momentum": 0.99}}) as sink:
            sink.log(start, {"reward/mean": 1.0})
        time.sleep(1.1)  # wandb names offline run directories by the second: keep the two apart
    run_id = (tmp_path / "wandb_id").read_text()
    offline_runs = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline_runs) == 2 and all((d / f"run-{run_id}.wandb").exists() for d in offline_runs)


def test_bad_wandb_mode_names_the_setting(tmp_path):
    with pytest.raises(ValueError, match="log.wandb"):
        MetricsSink(tmp_path, total_steps=1, wandb_mode="cloud", live=False)


def test_live_display_runs_without_a_terminal(tmp_path):
    from rich.console import Console

    console = Console(record=True, width=120, force_terminal=False)
    with MetricsSink(tmp_path, total_steps=2, wandb_mode="disabled", console=console) as sink:
        with sink.phase("rollout"):
            pass
        sink.log(0, {"reward/mean": 0.5, "accuracy/true": 0.25})
        sink.log(1, {"reward/mean": 0.75})
    assert "2/2" in console.export_text()


def test_without_a_terminal_every_step_is_one_line_written_at_once(tmp_path):
    """Under Slurm or nohup stderr is a file: a live bar would reach it only as one line at the end."""
    import io

    from rich.console import Console

    stream = io.StringIO()
    sink = MetricsSink(tmp_path, total_steps=40, wandb_mode="disabled", console=Console(file=stream, width=40))
    with sink.phase("rollout"):
        time.sleep(0.01)
    sink.log(0, {"reward/mean": 0.5, "label/share_mean": 0.75, "accuracy/true": None, "entropy/mean": 0.8125,
                 "alarm/collapse": 0.0})
    first = stream.getvalue()
    assert first.count("\n") == 1  # there before the next step or close
    assert re.fullmatch(r"step 1/40  rollout 0\.0s \(0\.0s\)  reward 0\.5  label share 0\.75  H 0\.812\n",
                        first), first
    sink.log(1, {"reward/mean": 0.25, "accuracy/true": 0.5, "alarm/collapse": 1.0})
    sink.close()
    second = stream.getvalue()[len(first):]
    assert second.startswith("step 2/40  ") and second.endswith("reward 0.25  acc 0.5  ALARM\n"), second


def test_on_a_terminal_the_live_bar_shows_instead_of_lines(tmp_path):
    from rich.console import Console

    console = Console(record=True, width=120, force_terminal=True)
    with MetricsSink(tmp_path, total_steps=2, wandb_mode="disabled", console=console) as sink:
        assert sink._progress is not None
        sink.log(0, {"reward/mean": 0.5})
    assert "step 1/2" not in console.export_text()


def test_plots_cover_present_metrics_and_skip_absent_ones(tmp_path):
    with MetricsSink(tmp_path, total_steps=4, wandb_mode="disabled", live=False) as sink:
        for step in range(4):
            with sink.phase("rollout"):
                pass
            with sink.phase("train"):
                pass
            sink.log(step, {"reward/mean": step / 4, "kl/mean": 0.01 * step, "accuracy/true": 0.5,
                            "accuracy/true_momentum": 0.4 if step % 2 == 0 else None, "anchor/flip_rate": 0.1})
    written = {p.name for p in plot_metrics(tmp_path)}
    # kl/mean is also one of the collapse signals; absent metrics (entropy, lengths, ...) draw nothing
    assert written == {"reward.png", "kl.png", "true_accuracy.png", "step_time.png", "collapse_signals.png",
                       "anchor.png"}
    for name in written:
        assert (tmp_path / "plots" / name).read_bytes()[:4] == b"\x89PNG"


def test_true_accuracy_plot_starts_with_the_initial_accuracy(tmp_path, monkeypatch):
    """The accuracy before training is in summary.json only; the plot draws it at step 0."""
    from matplotlib.figure import Figure

    with MetricsSink(tmp_path, total_steps=20, wandb_mode="disabled", live=False) as sink:
        for step in range(20):
            sink.log(step, {"accuracy/true": 0.5 if step in (9, 19) else None})
    (tmp_path / "summary.json").write_text(json.dumps({"initial_true_accuracy": 0.25}))
    drawn = {}
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda figure, path, **kw: (
        drawn.update({path.stem: [line.get_xydata().tolist() for line in figure.axes[0].lines]}),
        save(figure, path, **kw)))
    plot_metrics(tmp_path)
    assert drawn["true_accuracy"] == [[[0, 0.25], [9, 0.5], [19, 0.5]]]


def test_summary_table_lists_every_entry():
    from rich.console import Console

    console = Console(record=True, width=80)
    console.print(summary_table({"steps": 20, "final_true_accuracy": 0.123456}))
    text = console.export_text()
    assert "steps" in text and "20" in text and "0.1235" in text
    console.print(summary_table({"splits": {"sizes": {"rl": 20, "warmstart": 30, "eval": 5},
                                            "overlap": {"rl-eval": 0, "rl-warmstart": 0, "warmstart-eval": 0},
                                            "fingerprints": {"rl": "abc"}}}))
    assert "20 / 30 / 5, 0 shared" in console.export_text() and "abc" not in console.export_text()


# ------------------------------------------------------------------------------------------------
# collapse alarm


def history(steps, **signals):
    """Synthetic per-step records: `signals` maps a metric key to a function of the step."""
    return [{"step": t, **{key: value(t) for key, value in signals.items()}} for t in range(steps)]


def ramp(start, end, first=20, last=45):
    """`start` until step `first`, then linearly to `end` at step `last`, then flat."""
    return lambda t: start + (end - start) * min(1.0, max(0, t - first) / (last - first))


def healthy(steps=60):
    """Learning as a gold reward drove it: votes firm up, entropy falls to a third, KL stays small."""
    return history(steps, **{"kl/mean": lambda t: 0.03 + 0.02 * (t % 3), "label/agreement": lambda t: 0.8,
                             "label/share_mean": ramp(0.55, 0.95), "entropy/mean": ramp(1.2, 0.4),
                             "response/length_mean": lambda t: 40 + (t % 3)})


def drifting(steps=60):
    """From step 20 to 45 the policy walks away from the initial policy (KL 0.02 -> 0.5)."""
    return history(steps, **{"kl/mean": ramp(0.02, 0.5)})


def splitting(steps=60):
    """No KL logged (algo.kl_coef=0 log.drift=false); the policy's vote parts from the momentum model's (0.8 -> 0.3)."""
    return history(steps, **{"label/agreement": ramp(0.8, 0.3)})


def first_alarm(run):
    """The step at which the alarm first fires when replayed step by step, as the trainer does."""
    return next((run[end - 1]["step"] for end in range(1, len(run) + 1) if collapse_alarm(run[:end]).alarm), None)


def test_healthy_run_raises_no_alarm():
    assert first_alarm(healthy()) is None
    assert collapse_alarm(healthy()) == (False, [])


def test_drift_from_the_initial_policy_raises_the_alarm():
    alarm, reasons = collapse_alarm(drifting())
    assert alarm and len(reasons) == 1 and "KL" in reasons[0]
    # the median of steps 25-34 is the first at or above 0.2 (0.202; that of steps 24-33 is 0.183)
    assert first_alarm(drifting()) == 34
    assert all(collapse_alarm(drifting()[:end]).alarm for end in range(35, 61))  # and stays raised


def test_drift_below_the_ceiling_or_a_single_spike_is_not_an_alarm():
    assert collapse_alarm(history(60, **{"kl/mean": lambda t: 0.15})) == (False, [])
    spikes = history(60, **{"kl/mean": lambda t: 5.0 if t % 10 == 0 else 0.05})  # one step in ten
    assert first_alarm(spikes) is None


def test_policy_momentum_split_raises_the_alarm_without_kl():
    alarm, reasons = collapse_alarm(splitting())
    assert alarm and len(reasons) == 1 and "agreement" in reasons[0]
    # the mean of steps 26-35 (0.59) is the first at least 0.2 below that of steps 0-9 (0.8)
    assert first_alarm(splitting()) == 35


def test_a_small_agreement_dip_is_not_an_alarm():
    assert first_alarm(history(60, **{"label/agreement": ramp(0.8, 0.65)})) is None


def test_both_signals_are_reported():
    run = [{**a, **b} for a, b in zip(drifting(), splitting())]
    alarm, reasons = collapse_alarm(run)
    assert alarm and len(reasons) == 2


def test_confidence_alone_is_not_an_alarm():
    """Unanimous votes, a certain policy and short answers also come with learning: not read."""
    confident = history(60, **{"kl/mean": lambda t: 0.05, "label/share_mean": ramp(0.5, 1.0),
                               "entropy/mean": ramp(1.2, 0.1), "response/length_mean": ramp(40, 8)})
    assert first_alarm(confident) is None


def test_gold_derived_metrics_are_never_read():
    gold = {"accuracy/true": ramp(0.8, 0.0), "accuracy/eval": ramp(0.8, 0.0), "label/accuracy": ramp(0.8, 0.0),
            "reward/mean": ramp(0.5, 1.0)}
    assert first_alarm(history(60, **gold, **{"kl/mean": lambda t: 0.05})) is None
    with_gold = [{**r, **g} for r, g in zip(drifting(), history(60, **gold))]
    assert first_alarm(with_gold) == first_alarm(drifting())


def test_short_or_empty_histories_are_not_judged():
    assert collapse_alarm([]) == (False, [])
    assert collapse_alarm(history(9, **{"kl/mean": lambda t: 1.0})) == (False, [])  # drift needs 10 steps
    assert collapse_alarm(history(10, **{"kl/mean": lambda t: 1.0})).alarm
    # the split needs a baseline and a recent window that do not overlap: 20 steps
    split = {"label/agreement": lambda t: 0.9 if t < 10 else 0.1}
    assert collapse_alarm(history(19, **split)) == (False, [])
    assert collapse_alarm(history(20, **split)).alarm
    assert collapse_alarm(history(40, **{"entropy/mean": lambda t: 1.0})) == (False, [])


def _tensorboard_scalars(run_dir):
    """{tag: [(step, value), ...]} as TensorBoard reads the run's event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_gets_the_numeric_metrics_and_a_resume_replaces_rolled_back_steps(tmp_path):
    pytest.importorskip("tensorboard", reason="pip install tensorboard (the test extra)")
    run_steps(tmp_path, range(3), tensorboard=True)
    scalars = _tensorboard_scalars(tmp_path)
    assert [(step, pytest.approx(value)) for step, value in scalars["reward/mean"]] == [(0, 0.0), (1, 0.1), (2, 0.2)]
    assert [step for step, _ in scalars["time/rollout"]] == [0, 1, 2]  # phase times, like metrics.jsonl

    with MetricsSink(tmp_path, total_steps=10, start_step=1, wandb_mode="disabled", live=False,
                     tensorboard=True) as sink:
        sink.log(1, {"reward/mean": 0.5, "note": "text"})  # a string has no scalar: left out
    scalars = _tensorboard_scalars(tmp_path)
    assert [(step, pytest.approx(value)) for step, value in scalars["reward/mean"]] == [(0, 0.0), (1, 0.5)]
    assert "note" not in scalars


def test_tensorboard_off_writes_no_event_files(tmp_path):
    run_steps(tmp_path, range(2))
    assert not (tmp_path / "tensorboard").exists()


def test_tensorboard_without_the_package_names_it(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    from megatron_mgrpo.config import ConfigError

    with pytest.raises(ConfigError, match="log.tensorboard=true needs the tensorboard package: pip install"):
        MetricsSink(tmp_path, total_steps=1, wandb_mode="disabled", live=False, tensorboard=True)
