"""The metrics sink (jsonl, resume, wandb), phase timing, plots, summary and the collapse alarm."""

import json
import time

import pytest

from megatron_mgrpo.metrics import (MetricsSink, PhaseTimer, collapse_alarm, plot_metrics, read_metrics,
                                    summary_table)


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


def test_wandb_offline_writes_inside_the_run_dir_and_resumes_the_same_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # any network attempt would fail
    for start in (0, 1):
        with MetricsSink(tmp_path, total_steps=2, start_step=start, wandb_mode="offline", live=False,
                         config={"algo": {"momentum": 0.99}}) as sink:
            sink.log(start, {"reward/mean": 1.0})
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


def test_plots_cover_present_metrics_and_skip_absent_ones(tmp_path):
    with MetricsSink(tmp_path, total_steps=4, wandb_mode="disabled", live=False) as sink:
        for step in range(4):
            with sink.phase("rollout"):
                pass
            with sink.phase("train"):
                pass
            sink.log(step, {"reward/mean": step / 4, "kl/mean": 0.01 * step, "accuracy/true": 0.5,
                            "accuracy/eval": 0.4 if step % 2 == 0 else None})
    written = {p.name for p in plot_metrics(tmp_path)}
    assert written == {"reward.png", "kl.png", "true_accuracy.png", "step_time.png"}
    for name in written:
        assert (tmp_path / "plots" / name).read_bytes()[:4] == b"\x89PNG"


def test_summary_table_lists_every_entry():
    from rich.console import Console

    console = Console(record=True, width=80)
    console.print(summary_table({"steps": 20, "final_true_accuracy": 0.123456}))
    text = console.export_text()
    assert "steps" in text and "20" in text and "0.1235" in text


# ------------------------------------------------------------------------------------------------
# collapse alarm


def history(steps, share, entropy, length, agreement=None):
    """Synthetic per-step records; each signal is a function of the step."""
    records = []
    for t in range(steps):
        record = {"step": t, "label/share_mean": share(t), "entropy/mean": entropy(t),
                  "response/length_mean": length(t)}
        if agreement is not None:
            record["label/agreement"] = agreement(t)
        records.append(record)
    return records


def healthy(steps=60):
    """Votes become more confident and entropy eases down, but nothing runs away."""
    return history(steps, share=lambda t: 0.55 + 0.004 * t, entropy=lambda t: 1.2 - 0.004 * t,
                   length=lambda t: 40 + (t % 3), agreement=lambda t: 0.8)


def collapsing(steps=60):
    """From step 20 to 45: votes turn unanimous, entropy and length shrink, the policy leaves the anchor."""
    late = lambda t: min(1.0, max(0, t - 20) / 25)  # noqa: E731
    return history(steps, share=lambda t: 0.55 + 0.45 * late(t), entropy=lambda t: 1.2 * (1 - 0.9 * late(t)),
                   length=lambda t: 40 * (1 - 0.8 * late(t)), agreement=lambda t: 0.8 - 0.6 * late(t))


def test_healthy_run_raises_no_alarm():
    alarm, reasons = collapse_alarm(healthy())
    assert not alarm and reasons == []


def test_collapsing_run_raises_the_alarm_with_every_reason():
    alarm, reasons = collapse_alarm(collapsing())
    assert alarm
    assert len(reasons) == 4
    assert any("entropy" in r for r in reasons) and any("agreement" in r for r in reasons)


def test_alarm_fires_only_once_collapse_is_visible():
    run = collapsing()
    fired = [collapse_alarm(run[:end]).alarm for end in range(20, 61)]
    assert not fired[0] and fired[-1]
    first = fired.index(True)
    assert all(fired[first:])  # once collapsed, it stays raised


def test_one_signal_alone_is_not_an_alarm():
    sharpening = history(40, share=lambda t: 0.6 if t < 20 else 0.99, entropy=lambda t: 1.0,
                         length=lambda t: 30.0)
    alarm, reasons = collapse_alarm(sharpening)
    assert not alarm and len(reasons) == 1 and "vote share" in reasons[0]


def test_runs_without_a_momentum_model_are_judged_on_the_other_signals():
    run = [{k: v for k, v in r.items() if k != "label/agreement"} for r in collapsing()]
    alarm, reasons = collapse_alarm(run)
    assert alarm and len(reasons) == 3


def test_short_or_empty_histories_are_not_judged():
    assert collapse_alarm(collapsing()[:19]) == (False, [])
    assert collapse_alarm([{"step": t} for t in range(40)]) == (False, [])
