"""What a run can check before its expensive work (process groups, the warm start, engines):
the parallel layout against the model's config.json and the number of processes, and every
prompt's length after the template against the context the engines are given."""

from __future__ import annotations

import json
from pathlib import Path

from megatron_mgrpo.config import Config, ConfigError
from megatron_mgrpo.data.records import DataError, PromptRecord


def check_layout(cfg: Config, model_dir: Path) -> None:
    """Heads, KV heads, layers and experts divided by the parallel sizes (the launch planner's
    rules), then the sizes dividing the processes of this job."""
    from megatron_mgrpo.launch.model_shape import read_model_shape
    from megatron_mgrpo.launch.planner import check_model_split
    from megatron_mgrpo.parallel.dist import data_parallel_size, launch_from_env

    config = model_dir / "config.json"
    check_model_split(cfg, read_model_shape(json.loads(config.read_text(encoding="utf-8")), str(config)))
    p = cfg.parallel
    try:
        data_parallel_size(launch_from_env().world_size, tp=p.tp, pp=p.pp, ep=p.ep, cp=p.cp)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def check_lengths(cfg: Config, model_dir: Path, prompts: list[PromptRecord], eval_prompts: list[PromptRecord]) -> None:
    """launch.max_prompt_tokens + rollout.max_new_tokens within the model's positions, and every
    RL and evaluation prompt, rendered as the trainer renders it, within launch.max_prompt_tokens
    (the context a vLLM / SGLang server is started with; the in-process engine keeps the same
    rule, so a config behaves alike on every engine)."""
    from transformers import AutoConfig, AutoTokenizer

    from megatron_mgrpo.data.templates import PromptTemplate

    budget, new = cfg.launch.max_prompt_tokens, cfg.rollout.max_new_tokens
    positions = AutoConfig.from_pretrained(model_dir).max_position_embeddings
    if budget + new > positions:
        raise ConfigError(f"launch.max_prompt_tokens={budget} + rollout.max_new_tokens={new} = {budget + new} "
                          f"exceeds the model's {positions} positions (max_position_embeddings): lower either")
    template = PromptTemplate(AutoTokenizer.from_pretrained(model_dir), cfg.data.template, cfg.data.few_shot,
                              prompts, cfg.data.seed)
    for split, records in (("data.path", prompts), ("eval", eval_prompts)):
        lengths = [len(template.encode(r)) for r in records]
        over = [(n, r) for n, r in zip(lengths, records) if n > budget]
        if over:
            longest, record = max(over, key=lambda pair: pair[0])
            raise DataError(f"{len(over)} prompt(s) of {split} are longer than launch.max_prompt_tokens={budget} "
                            f"after the template, the longest {record.id!r} with {longest} tokens: raise "
                            f"launch.max_prompt_tokens (the model has {positions} positions, {new} of them for "
                            f"the response) or remove those prompts")
