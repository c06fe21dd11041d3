"""The rollout pools a config describes: which engines serve the policy and the momentum weights.

A launcher that started the servers names them in `MGRPO_<POOL>_URLS` (`mgrpo launch` does, one
URL per engine); otherwise each pool gets one engine of its own: in-process, or a vLLM / SGLang
server started with `launch.engine_python`. Weights reach a server through files (shared memory
on this host, the run directory for a server elsewhere), except SGLang servers synced through a
weight group, which share one per pool (`mgrpo-<pool>`: trainer rank 0 and the
launch.rollout_tp GPUs of every server).
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

from megatron_mgrpo.config import Config
from megatron_mgrpo.rollout.pools import URLS_ENV, EnginePool, RolloutPools


def build_pools(cfg: Config, run_dir: Path, model_dir: Path, tokenizer, hf_model, dtype: str) -> RolloutPools:
    """The policy pool on `hf_model`'s weights (in-process) or `model_dir`'s, and the momentum pool
    when the label source samples from it; `dtype` is the trainer's parameter dtype."""
    build = functools.partial(_pool, cfg, run_dir, model_dir, tokenizer, dtype)
    momentum_samples = cfg.samples_per_prompt()[1]
    return RolloutPools(build("policy", hf_model), build("momentum") if momentum_samples else None)


def _pool(cfg: Config, run_dir: Path, model_dir: Path, tokenizer, dtype: str, name: str, hf_model=None) -> EnginePool:
    from megatron_mgrpo.rollout.pool_push import pool_weight_push
    from megatron_mgrpo.rollout.weight_broadcast import trainer_broadcaster

    urls = [url.strip() for url in os.environ.get(URLS_ENV[name], "").split(",") if url.strip()]
    kind = cfg.rollout.engine
    if urls and kind == "hf":
        raise ValueError(f"{URLS_ENV[name]} names rollout servers, but rollout.engine=hf samples in-process: "
                         f"set rollout.engine to the servers' kind (vllm or sglang), or unset {URLS_ENV[name]}")
    if not urls:
        return EnginePool(name, [_engine(cfg, run_dir, model_dir, tokenizer, dtype, name, hf_model)])
    broadcaster = None
    if kind == "sglang" and cfg.sglang_weight_sync() == "distributed":
        broadcaster = trainer_broadcaster(f"mgrpo-{name}", len(urls) * cfg.launch.rollout_tp,
                                          remote=not all(map(on_this_host, urls)))
    engines = [_engine(cfg, run_dir, model_dir, tokenizer, dtype, name, url=url, index=i, broadcaster=broadcaster)
               for i, url in enumerate(urls)]
    return EnginePool(name, engines, push=pool_weight_push(engines))


def _engine(cfg: Config, run_dir: Path, model_dir: Path, tokenizer, dtype: str, name: str, hf_model=None,
            url: str | None = None, index: int = 0, broadcaster=None):
    """One engine on the starting weights; an SGLang server at `url` given its pool's
    `broadcaster` takes the weight group's ranks from 1 + index * launch.rollout_tp on."""
    kind, python, logs = cfg.rollout.engine, cfg.launch.engine_python, run_dir / "logs"
    server = {"url": url}
    if url and not on_this_host(url):
        server["weights_dir"] = run_dir / "weight-sync"
    if kind == "vllm":
        from megatron_mgrpo.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(model_dir, python=python, log_dir=logs, name=name, dtype=dtype,
                          max_model_len=cfg.launch.max_prompt_tokens + cfg.rollout.max_new_tokens, **server)
    if kind == "sglang":
        from megatron_mgrpo.rollout.sglang_engine import SGLangEngine

        if broadcaster is not None:
            tp = cfg.launch.rollout_tp
            server.update(weight_sync="distributed", tp_size=tp, broadcaster=broadcaster, rank_offset=1 + index * tp)
        return SGLangEngine(model_dir, python=python, log_dir=logs, name=name,
                            routed_experts=cfg.train.routing_replay, **server)
    from megatron_mgrpo.models.loading import load_hf_model
    from megatron_mgrpo.rollout.hf_engine import HFEngine

    return HFEngine(hf_model or load_hf_model(model_dir), tokenizer, routed_experts=cfg.train.routing_replay)


def on_this_host(url: str) -> bool:
    return urlsplit(url).hostname in _this_host_names()


@functools.cache
def _this_host_names() -> frozenset[str]:
    """Looked up once: `getfqdn` may ask DNS, and every server URL is checked, some twice."""
    return frozenset(("localhost", "127.0.0.1", "::1", socket.gethostname(), socket.getfqdn()))
