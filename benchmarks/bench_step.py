"""One RL step on the embedded tiny model: ours (per phase) vs TRL's GRPOTrainer.

Same warm-started builtin:tiny-qwen3 (0.8M params, character tokenizer), same prompts
(builtin:small_sums), 8 prompts x G = 8 completions of at most 12 tokens, temperature 1.0, gold
rewards (GRPO with verifiable rewards, the configuration both can run), no KL term (TRL's default
beta = 0 skips its reference model; ours is set to match, and like TRL logs no drift), one
optimizer step per batch, fp32 on CPU, as many CPU threads as cores. TRL runs without gradient
checkpointing (its default would only slow it down at this size), in a fresh process of its own.
Also reported: a full M-GRPO step (momentum pool N = 2, IQR filter, KL 0.005 to the initial model).
Each figure is the median of the steps after the first.

Run: python benchmarks/bench_step.py   (needs `pip install trl`)
"""

import multiprocessing
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

STEPS = 21
COMMON = ["model.path=builtin:tiny-qwen3", "data.path=builtin:small_sums", "warmstart.steps=300",
          "rollout.group_size=8", "rollout.max_new_tokens=12", "rollout.temperature=1.0", "train.prompts_per_step=8",
          "train.lr=1e-4", "train.lr_warmup_steps=0", "algo.iqr_filter=false", "algo.kl_coef=0",
          "reward.label_source=gt", "eval.prompts=0", "log.drift=false"]
MGRPO = ["reward.label_source=mgrpo", "rollout.momentum_samples=2", "algo.iqr_filter=true", "algo.kl_coef=0.005"]


def ours(overrides: list[str], model_dir) -> tuple[float, dict[str, float]]:
    """Median step seconds and median seconds per phase of our trainer."""
    from megatron_mgrpo.config import load_config
    from megatron_mgrpo.data.datasets import load_prompts_from_config
    from megatron_mgrpo.metrics import PhaseTimer
    from megatron_mgrpo.trainer import Trainer

    cfg = load_config(overrides=COMMON + overrides)
    trainer = Trainer(cfg, Path("/tmp/bench_step"), model_dir, load_prompts_from_config(cfg.data).records, [])
    timer, steps = PhaseTimer(), []
    try:
        for step in range(STEPS):
            timer.take()
            trainer.step(step, timer.phase)
            steps.append(timer.take())
    finally:
        trainer.close()
    keys = [k for k in steps[-1] if k.startswith("time/")]
    return statistics.median(s["time/step"] for s in steps[1:]), {
        k: statistics.median(s.get(k, 0.0) for s in steps[1:]) for k in keys}


def trl_step(model_dir) -> float:
    """Median step seconds of TRL's GRPOTrainer on the same model, prompts and settings (run in a
    process of its own: nothing of ours, no gloo threads, the same number of CPU threads)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from megatron_mgrpo.answer_format import extract_answer
    from megatron_mgrpo.config import load_config
    from megatron_mgrpo.data.datasets import load_prompts_from_config
    from megatron_mgrpo.data.templates import PromptTemplate

    torch.set_num_threads(os.cpu_count())
    cfg = load_config(overrides=COMMON)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    records = load_prompts_from_config(cfg.data).records
    render = PromptTemplate(tokenizer, cfg.data.template).render
    dataset = Dataset.from_list([{"prompt": render(r), "answer": r.gold_answer} for r in records])

    def gold_reward(completions, answer, **_):
        return [float(extract_answer(c) == a) for c, a in zip(completions, answer)]

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], None

        def on_step_begin(self, *args, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            self.times.append(time.perf_counter() - self.start)

    r, t = cfg.rollout, cfg.train
    config = GRPOConfig(output_dir="/tmp/bench_step_trl", per_device_train_batch_size=t.prompts_per_step * r.group_size,
                        num_generations=r.group_size, max_completion_length=r.max_new_tokens, temperature=r.temperature,
                        learning_rate=t.lr, beta=0.0, max_steps=STEPS, use_cpu=True, bf16=False,
                        gradient_checkpointing=False, report_to=[], logging_steps=STEPS, save_strategy="no",
                        seed=t.seed)
    times = StepTimes()
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                          reward_funcs=gold_reward, args=config, train_dataset=dataset, processing_class=tokenizer,
                          callbacks=[times])
    trainer.train()
    return statistics.median(times.times[1:])


def main() -> None:
    from megatron_mgrpo.config import load_config
    from megatron_mgrpo.data.splits import build_splits
    from megatron_mgrpo.models.builtin import default_cache_dir, resolve_model_path
    from megatron_mgrpo.parallel.dist import destroy_distributed, init_distributed
    from megatron_mgrpo.parallel.ports import free_port
    from megatron_mgrpo.warmstart import warm_start

    torch.set_num_threads(os.cpu_count())
    os.environ["MASTER_PORT"] = str(free_port())
    cfg = load_config(overrides=COMMON)
    init_distributed(tp=1, seed=cfg.train.seed)
    try:
        model_dir = warm_start(cfg, resolve_model_path(cfg.model.path), default_cache_dir(),
                               build_splits(cfg).warmstart)
        grpo, grpo_phases = ours([], model_dir)
        mgrpo, mgrpo_phases = ours(MGRPO, model_dir)
    finally:
        destroy_distributed()
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as fresh_process:
        trl = fresh_process.submit(trl_step, model_dir).result()
    print(f"8 prompts x G=8, <= 12 new tokens, builtin:tiny-qwen3 fp32, {os.cpu_count()} CPU threads")
    print(f"{'run':<32}{'s/step':>8}  phases (median s)")
    for name, seconds, phases in (("ours: GRPO, gold rewards", grpo, grpo_phases),
                                  ("ours: M-GRPO (N=2, IQR, KL)", mgrpo, mgrpo_phases),
                                  ("TRL GRPOTrainer, gold rewards", trl, {})):
        detail = "  ".join(f"{k[5:]} {v:.3f}" for k, v in phases.items() if k != "time/step")
        print(f"{name:<32}{seconds:>8.3f}  {detail}")
    print(f"TRL / ours (same GRPO configuration): {trl / grpo:.2f}x")


if __name__ == "__main__":
    main()
