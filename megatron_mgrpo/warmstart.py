"""Supervised warm start: teach a freshly initialised builtin model the task's answer format.

Label-free RL needs a policy that already gets some answers right: a vote over random strings
labels nothing. The embedded default therefore first trains the tiny model with Megatron (the
same `MegatronPolicy` and optimizer as RL, with a next-token objective) on gold answers of the
warm-start split of a builtin task (`data.splits`: no question of it is an RL or evaluation
question, whatever the seeds), then saves it as an HF directory. It must learn the task, not
memorise its questions: its accuracy on the evaluation split is the run's initial true accuracy.
The result is cached under a digest of everything that shapes it (its questions included), so
later runs skip it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from megatron_mgrpo.config import Config, ConfigError
from megatron_mgrpo.data.records import PromptRecord
from megatron_mgrpo.data.splits import fingerprint
from megatron_mgrpo.train.batching import MicroBatch, TrainSequences


def answer_text(record: PromptRecord) -> str:
    """What the warm-started model learns to answer: just the boxed gold answer."""
    return f"\\boxed{{{record.gold_answer}}}"


def sft_objective(batch: MicroBatch, logp: torch.Tensor):
    """Mean negative log-likelihood of the response tokens."""
    mask = batch.response_mask
    tokens = int(mask.sum())
    loss = -torch.where(mask, logp, 0).sum() / max(tokens, 1)
    return loss, tokens, {}


def sft_sequences(records: list[PromptRecord], template) -> TrainSequences:
    tokenizer, tokens, prompts = template.tokenizer, [], []
    for record in records:
        prompt = template.encode(record)
        answer = tokenizer(answer_text(record), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        tokens.append(prompt + answer)
        prompts.append(len(prompt))
    return TrainSequences(tokens, prompts)


def cache_key(cfg: Config, model_dir: Path, records: list[PromptRecord]) -> str:
    settings = {"model": model_dir.name, "warmstart": dataclasses.asdict(cfg.warmstart),
                "data": [fingerprint(records), cfg.data.seed, cfg.data.template, cfg.data.few_shot],
                "seed": cfg.train.seed, "tokens": cfg.train.micro_batch_tokens}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def warm_start(cfg: Config, model_dir: Path, cache_root: Path, records: list[PromptRecord],
               progress=print) -> Path:
    """The warm-started HF directory for `model_dir`, trained on `records` (the warm-start split),
    now or earlier (the cache).

    Runs inside an initialised distributed job (any TP / PP / DP); rank 0 writes the directory.
    """
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from megatron_mgrpo.data.templates import PromptTemplate
    from megatron_mgrpo.models.builtin import save_hf_directory
    from megatron_mgrpo.models.hf_config import model_spec_from_hf
    from megatron_mgrpo.models.loading import load_hf_model
    from megatron_mgrpo.models.weight_map import load_checkpoint_tensors
    from megatron_mgrpo.train.policy import MegatronPolicy

    if not records:
        raise ConfigError("warmstart.steps > 0 needs the warm-start split's questions: build them with "
                          "data.splits.build_splits")
    target = cache_root / "warmstart" / f"{model_dir.name}-{cache_key(cfg, model_dir, records)}"
    if target.is_dir():
        return target
    settings = cfg.warmstart
    sft_cfg = dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, steps=settings.steps, lr=settings.lr, min_lr=settings.lr, lr_schedule="constant",
        lr_warmup_steps=min(20, settings.steps // 10), updates_per_rollout=1, weight_decay=0.0,
        routing_replay=False))  # supervised sequences come from no engine: the router routes freely
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    hf_model = load_hf_model(model_dir)
    template = PromptTemplate(tokenizer, cfg.data.template, cfg.data.few_shot, records, cfg.data.seed)
    policy = MegatronPolicy(model_spec_from_hf(hf_model.config, tp=cfg.parallel.tp), hf_model.state_dict(),
                            sft_cfg, momentum=False, pad_id=tokenizer.pad_token_id)
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(cfg.train.seed))
    for step in range(settings.steps):
        picked = [records[int(order[(step * settings.batch_size + i) % len(records)])]
                  for i in range(settings.batch_size)]
        metrics = policy.train_step(sft_sequences(picked, template), sft_objective)
        if step % 50 == 0 or step == settings.steps - 1:
            progress(f"warm start step {step + 1}/{settings.steps}: loss {metrics['loss']:.3f}")
    weights = dict(policy.hf_weights("policy"))
    if dist.get_rank() == 0:
        load_checkpoint_tensors(hf_model, weights)
        save_hf_directory(hf_model, tokenizer, target)
    dist.barrier()
    return target
