"""The trainer end to end on CPU: the embedded run in small, every label source, TP=2 / PP=2 equal
TP=1 on the first step, kill -9 + resume equals an uninterrupted run, gold never reaches a
label-free reward."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

from megatron_mgrpo.config import load_config
from megatron_mgrpo.metrics import read_metrics
from megatron_mgrpo.parallel.ports import free_port
from megatron_mgrpo.run import EMBEDDED_PRESET
from tests.helpers import SMALL, cache, killed_after_checkpoint, run_cli  # noqa: F401  (cache: autouse)


def _spawned_train(rank, world, port, overrides, out):
    from megatron_mgrpo.run import train

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    train(load_config(EMBEDDED_PRESET, SMALL + overrides), out)


@pytest.mark.slow
def test_embedded_run_writes_every_artifact(tmp_path):
    run_cli(tmp_path / "run")
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    for key in ("initial_true_accuracy", "final_true_accuracy", "steps", "wall_seconds"):
        assert summary[key] is not None, key
    assert summary["steps"] == 2
    records = read_metrics(run)
    assert [r["step"] for r in records] == [0, 1]
    for key in ("reward/mean", "label/accuracy", "label/agreement", "entropy/mean", "iqr/drop_rate", "kl/mean",
                "response/length_mean", "accuracy/true", "time/rollout", "time/train", "train/grad_norm",
                "accuracy/true_momentum", "anchor/flip_rate", "anchor/kl", "anchor/distance", "iqr/dropped",
                "vote/policy_correct", "vote/momentum_correct", "vote/label_correct", "momentum/m"):
        assert key in records[-1], key
    splits = json.loads((run / "splits.json").read_text())
    assert splits == summary["splits"] and splits["sizes"] == {"rl": 64, "warmstart": 500, "eval": 8}
    assert splits["overlap"] == {"rl-warmstart": 0, "rl-eval": 0, "warmstart-eval": 0}
    assert {p.name for p in (run / "plots").iterdir()} >= {"reward.png", "entropy.png", "true_accuracy.png",
                                                          "step_time.png", "kl.png"}
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "step_000002" / "complete.json").is_file()
    from transformers import AutoModelForCausalLM

    for which in ("policy", "momentum"):
        AutoModelForCausalLM.from_pretrained(run / "hf" / which)  # loadable HF directories


@pytest.mark.slow
@pytest.mark.parametrize("source", ["srt", "ttrl", "gt", "intuitor"])
def test_every_label_source_trains(tmp_path, source):
    run_cli(tmp_path / source, f"reward.label_source={source}", "train.steps=1", "eval.prompts=0")
    record = read_metrics(tmp_path / source)[0]
    assert "label/agreement" not in record  # only mgrpo samples the momentum model
    assert math.isfinite(record["train/loss"]) and record["iqr/kept"] > 0
    if source == "gt":  # every prompt has a gold label
        assert record["label/labelled"] == 1.0
    if source == "ttrl":  # 4 prompts x the first ttrl_train_samples=4 of G=6 responses are trainable
        assert record["iqr/kept"] <= 16
    if source == "intuitor":  # self-certainty rewards are real numbers, not votes
        assert record["reward/mean"] not in (0.0, 1.0) and record["reward/mean"] > 0


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("tp, pp, source", [(2, 1, "mgrpo"), (1, 2, "mgrpo"), (2, 1, "intuitor")],
                         ids=["TP=2", "PP=2", "intuitor-TP=2"])
def test_parallel_first_step_matches_tp1(tmp_path, tp, pp, source):
    """Intuitor's rewards (self-certainty) come from the trainer's vocab-parallel scoring pass."""
    run_cli(tmp_path / "tp1", "train.steps=1", "eval.prompts=0", f"reward.label_source={source}")
    overrides = ["train.steps=1", "eval.prompts=0", f"parallel.tp={tp}", f"parallel.pp={pp}",
                 f"reward.label_source={source}"]
    mp.start_processes(_spawned_train, args=(2, free_port(), overrides, tmp_path / "par"), nprocs=2,
                       start_method="spawn")
    single, parallel = read_metrics(tmp_path / "tp1")[0], read_metrics(tmp_path / "par")[0]
    loss_abs = 1e-6
    if source == "intuitor":  # rewards from the trainer's forward: equal up to rounding
        assert parallel["reward/mean"] == pytest.approx(single["reward/mean"], rel=1e-5)
        # The loss is a mean of unit-scale terms (group-normalised advantages) that cancel to ~0.01;
        # reward rounding divided by a small within-group spread moves it by ~1e-5 absolute.
        loss_abs = 1e-4
    else:
        assert parallel["reward/mean"] == single["reward/mean"]  # identical samples
    assert parallel["train/loss"] == pytest.approx(single["train/loss"], rel=1e-4, abs=loss_abs)
    for key in ("train/grad_norm", "entropy/mean"):
        assert parallel[key] == pytest.approx(single[key], rel=1e-4, abs=1e-6), key


def _first_steps(rank, port, variants, steps, results):
    """The first `steps` steps of one trainer per variant (name -> (overrides, score_first, or None
    for the trainer's own choice[, (policy, momentum) staleness bounds of producers to start])),
    all from the same warm start and seeds; the policy's HF weights after them under name/weights."""
    from pathlib import Path

    from megatron_mgrpo.data.splits import build_splits
    from megatron_mgrpo.metrics import PhaseTimer
    from megatron_mgrpo.models.builtin import default_cache_dir, resolve_model_path
    from megatron_mgrpo.parallel.dist import Launch, destroy_distributed, init_distributed
    from megatron_mgrpo.trainer import Trainer
    from megatron_mgrpo.warmstart import warm_start

    configs = {name: load_config(EMBEDDED_PRESET, SMALL + spec[0]) for name, spec in variants.items()}
    init_distributed(seed=next(iter(configs.values())).train.seed, launch=Launch(rank, 1, rank, "127.0.0.1", port))
    try:
        for name, (_, score_first, *bounds) in variants.items():
            cfg = configs[name]
            splits = build_splits(cfg)
            model_dir = warm_start(cfg, resolve_model_path(cfg.model.path), default_cache_dir(), splits.warmstart)
            trainer = Trainer(cfg, Path(results["dir"]), model_dir, splits.rl, [])
            if score_first is not None:
                trainer.score_first = score_first
            try:
                trainer.start_rollout(0, *bounds)  # as the run does: producers if the config or bounds ask
                results[name] = [trainer.step(step, PhaseTimer().phase) for step in range(steps)]
                results[f"{name}/weights"] = dict(trainer.policy.hf_weights("policy"))
            finally:
                trainer.close()
    finally:
        destroy_distributed()


def first_steps(tmp_path, variants, steps=1, with_weights=False):
    """Each variant's metrics per step (and, `with_weights`, its policy's HF weights after them)."""
    results = mp.Manager().dict(dir=str(tmp_path))
    mp.start_processes(_first_steps, args=(free_port(), variants, steps, results), nprocs=1, start_method="spawn")
    runs = {name: results[name] for name in variants}
    return (runs, {name: results[f"{name}/weights"] for name in variants}) if with_weights else runs


@pytest.mark.slow
def test_producers_at_staleness_zero_give_the_synchronous_steps(tmp_path):
    """Asynchronous rollout at bound 0 (both pools' producers wait for the weights the synchronous
    step samples with) gives the same samples, losses and weights over 3 steps as the synchronous
    step, which rollout.max_staleness=0 runs."""
    three = ["train.steps=3"]
    runs, weights = first_steps(tmp_path, {"synchronous": (three, None), "producers": (three, None, (0, 0))},
                                steps=3, with_weights=True)
    for synchronous, produced in zip(runs["synchronous"], runs["producers"]):
        assert produced["rollout/staleness_max"] == synchronous["rollout/staleness_max"] == 0
        for key in ("reward/mean", "label/agreement", "response/length_mean", "iqr/kept"):
            assert produced[key] == synchronous[key], key  # identical samples
        for key in ("train/loss", "train/grad_norm", "entropy/mean", "anchor/kl"):
            assert produced[key] == pytest.approx(synchronous[key], rel=1e-5, abs=1e-7), key
    synchronous, produced = weights["synchronous"], weights["producers"]
    assert synchronous.keys() == produced.keys()
    assert all(torch.allclose(synchronous[k], produced[k], rtol=1e-5, atol=1e-7) for k in synchronous)


@pytest.mark.slow
def test_staleness_bound_one_runs_a_step_ahead_and_never_further(tmp_path):
    """max_staleness=1: from step 1 on, every policy sample was made on the previous step's
    weights while that step trained (staleness exactly 1, never 2), its log-probs scored again by
    the trainer (the gap to the engine's is what TIS corrects); the momentum pool may run 2 ahead."""
    runs = first_steps(tmp_path, {"async": (["rollout.max_staleness=1", "rollout.momentum_max_staleness=2",
                                             "algo.iqr_filter=false", "train.steps=4"], None)}, steps=4)
    records = runs["async"]
    assert [r["rollout/staleness_max"] for r in records] == [0, 1, 1, 1]
    assert [r["rollout/staleness_1"] for r in records] == [0, 1, 1, 1] and records[-1]["rollout/regenerated"] == 0
    assert records[0]["rollout/logprob_gap"] < 1e-4 < records[2]["rollout/logprob_gap"]  # scored although no IQR
    assert all(math.isfinite(r["train/loss"]) and r["iqr/kept"] > 0 for r in records)


@pytest.mark.slow
def test_dynamic_sampling_trains_on_informative_prompts_within_the_refill_limit(tmp_path):
    """rollout.filter_groups: the step's own prompts are judged as without it (step 0: the same
    samples, the same informative share); prompts with equal rewards are replaced by further ones
    until 4 are informative, drawing at most max_oversample x 4; at 1.0 nothing beyond the batch."""
    three, dynamic = ["train.steps=3"], ["train.steps=3", "rollout.filter_groups=true"]
    runs = first_steps(tmp_path, {"plain": (three, None),
                                  "dynamic": (dynamic + ["rollout.max_oversample=2.5"], None),
                                  "capped": (dynamic + ["rollout.max_oversample=1.0"], None)}, steps=3)
    shares = {run: records[0]["dynamic/informative_share"] for run, records in runs.items()}
    assert shares["plain"] == shares["dynamic"] == shares["capped"]  # step 0: the same samples
    for plain, dynamic, capped in zip(runs["plain"], runs["dynamic"], runs["capped"]):
        assert "dynamic/drawn" not in plain
        informative = round(4 * capped["dynamic/informative_share"])
        assert capped["dynamic/drawn"] == 4 and capped["dynamic/trained_prompts"] == (informative or 4)
        own = round(4 * dynamic["dynamic/informative_share"])
        assert (dynamic["dynamic/drawn"] > 4) == (own < 4) and dynamic["dynamic/drawn"] <= 10
        assert dynamic["dynamic/trained_prompts"] <= 4
        if dynamic["dynamic/drawn"] < 10:  # not out of draws: 4 prompts, every one informative
            assert dynamic["dynamic/trained_prompts"] == dynamic["dynamic/trained_informative"] == 4
        else:  # out of draws: the informative ones found, or (none) the batch as it was
            assert dynamic["dynamic/trained_informative"] in (dynamic["dynamic/trained_prompts"], 0)
    assert any(r["dynamic/drawn"] > 4 for r in runs["dynamic"])  # the refill ran


@pytest.mark.slow
def test_an_update_not_scored_first_equals_one_scored_first(tmp_path):
    """Without the IQR filter, Intuitor or several updates per rollout the step skips its scoring
    pass: the update's own detached log-probs are the old ones, and its forward, which then reads
    every policy response (those without a label flagged out of the loss), measures the entropy.
    Loss, gradient, KL and entropy equal those of a step that scored first."""
    overrides = ["reward.label_source=srt", "algo.iqr_filter=false",
                 "algo.kl_coef=0.01", "reward.vote_threshold=0.2"]
    runs = first_steps(tmp_path, {"scored": (overrides, True), "not scored": (overrides, False)})
    (scored,), (not_scored,) = runs["scored"], runs["not scored"]
    assert 0 < scored["label/labelled"] < 1  # some prompts have no label: the trained flag has work to do
    assert not_scored["reward/mean"] == scored["reward/mean"]  # identical samples
    for key in ("train/loss", "train/grad_norm", "entropy/mean", "kl/mean", "iqr/kept"):
        assert not_scored[key] == pytest.approx(scored[key], rel=1e-5, abs=1e-7), key


@pytest.mark.slow
def test_drift_is_logged_without_a_kl_term_and_leaves_the_update_alone(tmp_path):
    """With algo.kl_coef=0 the KL to the initial policy is still measured (log.drift, the collapse
    alarm's drift signal) but never enters the loss: two steps train exactly as without it."""
    overrides = ["reward.label_source=srt", "algo.kl_coef=0", "train.lr=0.003"]
    runs = first_steps(tmp_path, {"drift": (overrides, None), "no drift": (overrides + ["log.drift=false"], None)},
                       steps=2)
    assert all("kl/mean" not in m for m in runs["no drift"])
    first, second = (m["kl/mean"] for m in runs["drift"])
    assert first == pytest.approx(0, abs=1e-6)  # step 0 trains the initial weights themselves
    assert second > 1e-6  # one update later the policy has moved
    for drift, no_drift in zip(runs["drift"], runs["no drift"]):
        for key in ("reward/mean", "train/loss", "train/grad_norm", "entropy/mean"):
            assert drift[key] == no_drift[key], key


@pytest.mark.slow
def test_anchor_diagnostics_measure_the_momentum_model(tmp_path):
    """Before any update policy, momentum and initial weights are one: KL and distances 0. After one
    update theta_m = m theta_0 + (1 - m) theta_1, so ||theta_1 - theta_m|| = m ||theta_1 - theta_0||;
    with m = 1 the momentum model stays the warm start. With vote_pool=momentum the label is the
    momentum model's vote."""
    base = ["train.lr=0.003", "train.steps=3", "eval.interval=3"]
    runs = first_steps(tmp_path, {"ema": (base, None),
                                  "frozen": (base + ["algo.momentum=1.0", "reward.vote_pool=momentum"], None)},
                       steps=3)
    for records in runs.values():
        first = records[0]
        assert first["anchor/kl"] == pytest.approx(0, abs=1e-6) and first["anchor/distance"] == 0.0
        assert first["anchor/distance_initial"] == 0.0 and 0 <= first["anchor/flip_rate"] <= 1
    second = runs["ema"][1]
    assert second["anchor/distance_initial"] > 0
    assert second["anchor/distance"] == pytest.approx(0.99 * second["anchor/distance_initial"], rel=1e-5)
    assert second["anchor/kl"] > 0 and runs["ema"][1]["momentum/m"] == 0.99
    frozen = runs["frozen"]
    assert all(r["momentum/m"] == 1.0 for r in frozen)
    assert frozen[2]["anchor/distance_initial"] > 0
    assert frozen[2]["anchor/distance"] == pytest.approx(frozen[2]["anchor/distance_initial"], rel=1e-6)
    for record in frozen:  # the label is the momentum model's vote
        assert record["vote/label_correct"] == record["vote/momentum_correct"]


@pytest.mark.slow
def test_kill_minus_nine_then_resume_equals_an_uninterrupted_run(tmp_path):
    steps = ["train.steps=4", "eval.interval=2"]
    run_cli(tmp_path / "straight", *steps)
    assert killed_after_checkpoint(tmp_path / "killed", steps, step=2)
    run_cli(tmp_path / "killed", *steps)  # the same command again
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "killed")
    assert [r["step"] for r in resumed] == [0, 1, 2, 3]
    for a, b in zip(straight, resumed):
        assert ("accuracy/true" in a) == ("accuracy/true" in b) == (a["step"] % 2 == 1), a["step"]
        for key in ("reward/mean", "train/loss", "train/grad_norm", "entropy/mean", "accuracy/true"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (a["step"], key)


@pytest.mark.slow
def test_a_resumed_asynchronous_run_trains_only_on_samples_made_after_the_restore(tmp_path):
    """kill -9 after the checkpoint of step 2, while the producer had step 2's samples made on
    version 1: the resumed run makes them again on the restored weights (staleness 0), then runs
    ahead again."""
    steps = ["train.steps=4", "checkpoint.interval=2", "rollout.max_staleness=1"]
    assert killed_after_checkpoint(tmp_path / "run", steps, step=2)
    assert not (tmp_path / "run" / "summary.json").exists()
    run_cli(tmp_path / "run", *steps)
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert [r["rollout/staleness_max"] for r in records] == [0, 1, 0, 1]


@pytest.mark.slow
def test_gold_answers_never_reach_a_label_free_reward(tmp_path):
    """The same prompts with true and with absurd gold answers: identical rewards and losses for
    mgrpo; only the monitoring metric (pseudo-label accuracy) sees the difference."""
    from megatron_mgrpo.data.splits import builtin_split

    records = builtin_split("small_sums", "rl", 16, 0)  # questions the warm start does not train on
    for name, gold in (("true", None), ("absurd", "\\pi^{99}")):
        with open(tmp_path / f"{name}.jsonl", "w") as handle:
            for r in records:
                handle.write(json.dumps({"id": r.id, "question": r.question, "answer": gold or r.gold_answer}) + "\n")
        run_cli(tmp_path / name, f"data.path={tmp_path / name}.jsonl", "train.steps=1", "eval.prompts=0")
    true, absurd = read_metrics(tmp_path / "true")[0], read_metrics(tmp_path / "absurd")[0]
    for key in ("reward/mean", "train/loss", "train/grad_norm"):
        assert true[key] == absurd[key], key
    assert true["reward/mean"] > 0  # the vote labelled something, so the comparison has teeth
    assert absurd["label/accuracy"] == 0  # gold is still read, but only by the monitoring metric


@pytest.mark.slow
def test_sigusr1_checkpoints_at_the_end_of_the_step_and_exits(tmp_path):
    """Slurm's pre-preemption signal: a checkpoint of the finished step, a clean exit, then resume."""
    env = {**os.environ, "MASTER_PORT": str(free_port())}
    run = tmp_path / "run"
    command = [sys.executable, "-m", "megatron_mgrpo.cli", "train", "--out", str(run), *SMALL, "train.steps=30",
               "checkpoint.interval=1000", "eval.prompts=0"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while not read_metrics(run) and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGUSR1)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-2000:]
    saved = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert len(saved) == 1 and saved[0] != "step_000030", saved
    stopped_at = int(saved[0].split("_")[1])
    assert [r["step"] for r in read_metrics(run)] == list(range(stopped_at))
    run_cli(run, "train.steps=30", "checkpoint.interval=1000", "eval.prompts=0")
    assert [r["step"] for r in read_metrics(run)] == list(range(30))


@pytest.mark.slow
@pytest.mark.distributed
def test_moe_model_trains_with_the_engines_routing_replayed(tmp_path):
    """A Qwen3-MoE policy with train.routing_replay: both in-process engines report each token's
    experts and every Megatron forward (scoring, KL, training) imposes them; with the experts
    split over two ranks (EP=2, so also two data-parallel ranks with uneven shares) the first
    step equals the single-process one."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from megatron_mgrpo.models.builtin import build_tokenizer, save_hf_directory

    tokenizer = build_tokenizer()
    config = Qwen3MoeConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            num_experts=4, num_experts_per_tok=2, max_position_embeddings=512,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    save_hf_directory(Qwen3MoeForCausalLM(config), tokenizer, tmp_path / "moe")
    overrides = [f"model.path={tmp_path / 'moe'}", "train.routing_replay=true", "train.steps=1", "eval.prompts=0",
                 "launch.max_prompt_tokens=256"]  # the model has 512 positions
    run_cli(tmp_path / "ep1", *overrides)
    mp.start_processes(_spawned_train, args=(2, free_port(), overrides + ["parallel.ep=2"], tmp_path / "ep2"),
                       nprocs=2, start_method="spawn")
    single, split = read_metrics(tmp_path / "ep1")[0], read_metrics(tmp_path / "ep2")[0]
    assert single["iqr/kept"] > 0 and math.isfinite(single["train/loss"]) and math.isfinite(single["kl/mean"])
    assert 0 <= single["label/agreement"] <= 1  # the momentum engine sampled (and routed) too
    assert split["reward/mean"] == single["reward/mean"]  # identical samples
    for key in ("train/loss", "train/grad_norm", "entropy/mean", "kl/mean"):
        assert split[key] == pytest.approx(single[key], rel=1e-4, abs=1e-6), key
