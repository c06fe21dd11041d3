"""The GPU check: one call on a lent GPU machine that runs the project's GPU path and records what it measures.

A GPU machine is lent rarely and briefly (15 minutes of device time, no network, the repository
and at most 64 MiB carried), so everything is prepared on CPU: `fetch_wheels.sh` downloads the
wheels the machine lacks, `--dry-run` checks them here, and on the device this script installs
them into a temporary folder and runs the parts below, each with its own time budget and its
own try/except, so that a failing part records its error and the others still run. Results are
written to `results.json` after every part (a run cut short keeps what it measured) and the log
to `log.txt`, in `--out` (default: $OUT if set, else ./gpu_check_out).

    python tools/gpu_check/run.py --dry-run            # on CPU: wheels, sizes, imports, plan
    python tools/gpu_check/run.py --out "$OUT"         # on the GPU machine (about 8 minutes)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import logging
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
WHEELS = HERE / "wheels"
FETCH = "tools/gpu_check/fetch_wheels.sh"
CARRY_LIMIT = 64 * 2**20  # what the device call carries: the repository's files plus the wheels
#: Modules the runner and `pytest -m cuda` import that the device lacks: the wheels must provide them.
NEEDED_FROM_WHEELS = ("megatron", "omegaconf", "antlr4", "math_verify", "latex2sympy2_extended", "xxhash",
                      "psutil", "rich", "pytest", "pluggy", "iniconfig")
#: Modules the device provides (torch, transformers, safetensors, numpy and their dependencies).
ON_DEVICE = ("torch", "transformers", "safetensors", "numpy", "tokenizers", "huggingface_hub", "httpx", "yaml",
             "tqdm", "filelock", "jinja2", "sympy", "networkx", "packaging", "triton")
#: The ~1B Qwen3-like model every part uses (random init): 1.07e9 parameters.
MODEL = dict(vocab_size=32000, hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=8,
             head_dim=128, intermediate_size=6144, max_position_embeddings=4096, tie_word_embeddings=False)
#: `--smoke` (CPU, for the kit's own test): a tiny model of the same family, so every part's code runs.
SMOKE_MODEL = dict(MODEL, vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, intermediate_size=128)
#: bf16 logits: Megatron's error against HF fp32 may be at most this multiple of HF bf16's own error.
BF16_ERROR_RATIO = 2.0
#: fp32 logits: relative L2 error of Megatron fp32 against HF fp32 (same maths, other kernels).
FP32_TOLERANCE = 1e-3
PYTEST_BUDGET = 50

log = logging.getLogger("gpu_check")


@dataclass(frozen=True)
class Sizes:
    """Workload sizes: the device's, and the smoke test's tiny ones."""

    model: dict
    logits_tokens: int = 512  # per sequence, two sequences
    train: tuple[int, int, int] = (16, 128, 896)  # sequences, prompt tokens, response tokens
    logprob_tokens: int = 16384


DEVICE_SIZES = Sizes(MODEL)
SMOKE_SIZES = Sizes(SMOKE_MODEL, logits_tokens=16, train=(4, 4, 12), logprob_tokens=64)


@dataclass(frozen=True)
class Part:
    name: str
    budget_s: int
    what: str
    run: Callable[[Context, dict], None]


class PartTimeout(Exception):
    """Raised in the main thread by SIGALRM when a part outlives its budget."""


# ---------------------------------------------------------------------------------------------- dry run


def wheel_packages(fetch_script: Path = HERE / "fetch_wheels.sh") -> dict[str, str]:
    """name -> version of the PACKAGES list in fetch_wheels.sh (the one list of what to fetch)."""
    text = fetch_script.read_text()
    block = re.search(r"^PACKAGES=\((.*?)^\)", text, re.DOTALL | re.MULTILINE)
    if block is None:
        raise ValueError(f"{fetch_script}: no PACKAGES=( ... ) list")
    return dict(re.findall(r"^\s*([A-Za-z0-9_.-]+)==(\S+)\s*$", block.group(1), re.MULTILINE))


def _normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def wheel_modules(wheel: Path) -> set[str]:
    """Top-level import names a wheel installs, from its top_level.txt or else its RECORD (no installing)."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        top_level = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        if top_level:
            return {line.strip() for line in archive.read(top_level[0]).decode().splitlines() if line.strip()}
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        paths = [line.split(",")[0] for line in archive.read(record).decode().splitlines() if line]
    # a package is a folder; a top-level module a file (foo.py, foo.cpython-312-x86_64-linux-gnu.so)
    roots = {path.split("/")[0] if "/" in path else path.split(".")[0] for path in paths}
    return {root for root in roots if not root.endswith((".dist-info", ".data"))}


def wheel_name_version(wheel: Path) -> tuple[str, str]:
    """(normalised distribution name, version) from a wheel's file name."""
    name, version = wheel.name.split("-")[:2]
    return _normalised(name), version


def repo_bytes(repo: Path = REPO) -> int:
    """Bytes of the files the device call carries besides the wheels: tracked and untracked-not-ignored."""
    listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                             capture_output=True, check=True).stdout.decode()
    return sum((repo / name).stat().st_size for name in set(listing.split("\0")) if name and (repo / name).is_file())


def dry_run(wheels: Path, repo: Path = REPO) -> int:
    """Check, without installing, that a device call would have what it needs; print the plan. 0 when ready."""
    problems = []
    found = {}
    on_disk = {wheel_name_version(w): w for w in sorted(wheels.glob("*.whl"))}
    for name, version in wheel_packages().items():
        wheel = on_disk.get((_normalised(name), version))
        if wheel is None:
            problems.append(f"wheel missing: {name}=={version}")
        else:
            found[name] = wheel
    print(f"wheels in {wheels}:")
    for wheel in found.values():
        print(f"  {wheel.stat().st_size / 2**20:8.2f} MiB  {wheel.name}")
    wheel_total = sum(w.stat().st_size for w in found.values())
    tree = repo_bytes(repo)
    print(f"wheels {wheel_total / 2**20:.2f} MiB + repository files {tree / 2**20:.2f} MiB = "
          f"{(wheel_total + tree) / 2**20:.2f} MiB carried (limit {CARRY_LIMIT / 2**20:.0f} MiB)")
    if wheel_total + tree >= CARRY_LIMIT:
        problems.append(f"the carried tree is {(wheel_total + tree) / 2**20:.1f} MiB, over "
                        f"{CARRY_LIMIT / 2**20:.0f} MiB: drop wheels or untracked files")
    provided = set().union(*(wheel_modules(w) for w in found.values())) if found else set()
    uncovered = [m for m in NEEDED_FROM_WHEELS if m not in provided]
    if uncovered:
        problems.append(f"no wheel provides the modules {', '.join(uncovered)}")
    print("plan (on the device):")
    for part in PARTS:
        print(f"  {part.name:<11} {part.budget_s:4d} s  {part.what}")
    print(f"  total budget {sum(p.budget_s for p in PARTS)} s, + ~30 s install and start-up "
          f"(device call timeout: 540 s)")
    for problem in problems:
        print(f"error: {problem}")
    if any(p.startswith("wheel missing") for p in problems):
        print(f"fetch the wheels with: {FETCH}")
    print("dry run: ready" if not problems else f"dry run: NOT ready ({len(problems)} problems)")
    return 1 if problems else 0


# ---------------------------------------------------------------------------------------------- device helpers


def install_wheels(wheels: Path, target: Path) -> str:
    """Install the wheels into `target` offline and put it and the repository first on sys.path.

    pip when the interpreter has it; otherwise the wheels are unpacked (a wheel is a zip of its
    site-packages layout, and none of these needs an install-time step). Returns which was used.
    """
    files = sorted(str(w) for w in wheels.glob("*.whl"))
    if not files:
        raise FileNotFoundError(f"no wheels in {wheels}: run {FETCH} before the device call")
    if importlib.util.find_spec("pip") is not None:
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet",
                        "--disable-pip-version-check", "--target", str(target), *files], check=True)
        how = "pip"
    else:
        for wheel in files:
            zipfile.ZipFile(wheel).extractall(target)
        how = "unzip"
    sys.path[:0] = [str(target), str(REPO)]
    os.environ["PYTHONPATH"] = os.pathsep.join([str(target), str(REPO), os.environ.get("PYTHONPATH", "")])
    return how


def synchronize() -> None:
    """Wait for the GPU (nothing to wait for in the CPU smoke test)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cuda_seconds(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    """Median wall seconds of `fn` over `repeats`, the GPU synchronized around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@contextlib.contextmanager
def peak_memory(result: dict, key: str):
    """Record in result[key] the peak CUDA memory (GiB) allocated inside the block, above what it started with."""
    import torch

    if not torch.cuda.is_available():  # the CPU smoke test
        yield
        result[key] = None
        return
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    yield
    torch.cuda.synchronize()
    result[key] = round((torch.cuda.max_memory_allocated() - base) / 2**30, 3)


def relative_error(value, reference) -> float:
    """||value - reference|| / ||reference|| in fp64 (L2 over all elements)."""
    value, reference = value.double(), reference.double()
    return float((value - reference).norm() / reference.norm())


class Context:
    """What parts share: the 1B HF model, its Megatron twin and the policy, each built on first use."""

    def __init__(self, out: Path, sizes: Sizes, device: str):
        self.out, self.sizes, self.device = out, sizes, device
        self._hf = self._policy = None

    def hf_model(self):
        """The HF Qwen3 model in fp32 on the GPU, random weights from a fixed seed."""
        if self._hf is None:
            import torch
            from transformers import Qwen3Config, Qwen3ForCausalLM

            torch.manual_seed(0)
            with torch.device(self.device):
                self._hf = Qwen3ForCausalLM(Qwen3Config(**self.sizes.model)).eval()
        return self._hf

    def spec(self):
        from megatron_mgrpo.models.hf_config import model_spec_from_hf

        return model_spec_from_hf(self.hf_model().config)

    def megatron_model(self, dtype):
        """The Megatron GPTModel of the HF model, built and loaded by the project's own code."""
        from megatron_mgrpo.models.provider import build_gpt_model, load_hf_weights

        spec = self.spec()
        model = build_gpt_model(spec, params_dtype=dtype)
        load_hf_weights(model, self.hf_model().state_dict(), spec)
        return model.eval()

    def policy(self):
        """MegatronPolicy (DDP + distributed optimizer, bf16) of the HF model, built once."""
        if self._policy is None:
            from megatron_mgrpo.config import load_config
            from megatron_mgrpo.train.policy import MegatronPolicy

            cfg = load_config(overrides=["model.dtype=bf16", "train.lr=1e-5", "train.lr_warmup_steps=0",
                                         "train.micro_batch_tokens=8192", "train.prompt_sharing=never"])
            self._policy = MegatronPolicy(self.spec(), self.hf_model().state_dict(), cfg, momentum=True)
        return self._policy


# ---------------------------------------------------------------------------------------------- parts


def part_logits(ctx: Context, result: dict) -> None:
    """HF -> Megatron of the 1B model on CUDA: logits of Megatron bf16 / fp32 against HF bf16 / fp32.

    Pass: Megatron fp32 within FP32_TOLERANCE (relative L2) of HF fp32, and Megatron bf16's error
    against HF fp32 at most BF16_ERROR_RATIO times HF bf16's own (bf16 rounding, not a mapping error).
    """
    import copy

    import torch

    hf = ctx.hf_model()
    result["parameters"] = sum(p.numel() for p in hf.parameters())
    spec = ctx.spec()
    g = torch.Generator(ctx.device).manual_seed(0)
    ids = torch.randint(0, spec.vocab_size, (2, ctx.sizes.logits_tokens), device=ctx.device, generator=g)
    positions = torch.arange(ids.shape[1], device=ctx.device)[None].expand_as(ids)
    with torch.no_grad():
        reference = hf(input_ids=ids).logits.float()
        hf_bf16 = copy.deepcopy(hf).to(torch.bfloat16)
        hf_bf16_logits = hf_bf16(input_ids=ids).logits.float()
        del hf_bf16
        errors = {"hf_bf16_vs_hf_fp32": relative_error(hf_bf16_logits, reference)}
        for name, dtype in (("megatron_bf16", torch.bfloat16), ("megatron_fp32", torch.float32)):
            model = ctx.megatron_model(dtype)
            logits = model(ids, positions, attention_mask=None)[..., :spec.vocab_size].float()
            errors[f"{name}_vs_hf_fp32"] = relative_error(logits, reference)
            if dtype == torch.bfloat16:
                errors["megatron_bf16_vs_hf_bf16"] = relative_error(logits, hf_bf16_logits)
                result["bf16_top1_agreement_with_hf_bf16"] = float(
                    (logits.argmax(-1) == hf_bf16_logits.argmax(-1)).float().mean())
            del model, logits
    result["relative_l2_error"] = errors
    result["tolerance"] = (f"fp32: <= {FP32_TOLERANCE}; bf16: megatron_bf16_vs_hf_fp32 <= {BF16_ERROR_RATIO} x "
                           f"hf_bf16_vs_hf_fp32")
    result["passed"] = (errors["megatron_fp32_vs_hf_fp32"] <= FP32_TOLERANCE and
                        errors["megatron_bf16_vs_hf_fp32"] <= BF16_ERROR_RATIO * errors["hf_bf16_vs_hf_fp32"])


def _train_sequences(count: int, prompt: int, response: int, vocab: int):
    import torch

    from megatron_mgrpo.train.batching import TrainSequences

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, vocab, (count, prompt + response), generator=g).tolist()
    return TrainSequences(tokens, [prompt] * count)


def _mean_logprob_objective(batch, logp):
    """The simplest differentiable objective: minus the mean response-token log-prob (an SFT step)."""
    mask = batch.response_mask
    units = int(mask.sum())
    return -(logp * mask).sum() / max(units, 1), units, {}


def part_train(ctx: Context, result: dict) -> None:
    """One GPU, bf16: MegatronPolicy.train_step (megatron DDP + distributed optimizer, fp32 momentum copy):
    tokens/s, MFU (flops.py, on the GPU's dense bf16 peak) and peak memory of the build and of a step."""
    import torch

    from tools.gpu_check.flops import peak_bf16_flops, train_flops_per_token

    count, prompt, response = ctx.sizes.train
    sequences = _train_sequences(count, prompt, response, ctx.sizes.model["vocab_size"])
    with peak_memory(result, "build_peak_gib"):
        policy = ctx.policy()

    def step():
        return policy.train_step(sequences, _mean_logprob_objective)

    with peak_memory(result, "step_peak_gib"):
        result["first_step_s"] = cuda_seconds(step, repeats=1, warmup=0)
    seconds = cuda_seconds(step, repeats=3, warmup=0)
    tokens = count * (prompt + response)
    flops = train_flops_per_token(ctx.spec(), prompt + response)
    peak = peak_bf16_flops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
    result.update(step_s=seconds, tokens_per_step=tokens, tokens_per_s=tokens / seconds,
                  flops_per_token=flops, mfu=tokens * flops / seconds / peak if peak else None,
                  note="MFU counts the LM head on every token; the policy computes it on response tokens only")


def part_ema(ctx: Context, result: dict) -> None:
    """algo.ema_update_ (fp32 momentum) over the 1B model's tensors, from bf16 and fp32 sources, against a
    flat-buffer lerp_ and a device-to-device copy of the same bytes (the bandwidth any update needs)."""
    import torch

    from megatron_mgrpo.algo import ema_update_

    shapes = [p.shape for p in ctx.hf_model().parameters()]
    numel = sum(s.numel() for s in shapes)
    flat_ema = torch.zeros(numel, device=ctx.device)
    flat_src = {torch.float32: torch.randn(numel, device=ctx.device)}
    flat_src[torch.bfloat16] = flat_src[torch.float32].to(torch.bfloat16)
    copy_dst = torch.empty_like(flat_ema)
    copy_s = cuda_seconds(functools.partial(copy_dst.copy_, flat_src[torch.float32]))
    copy_bandwidth = 2 * copy_dst.nbytes / copy_s  # read + write
    del copy_dst
    result.update(tensors=len(shapes), parameters=numel, copy_gb_per_s=copy_bandwidth / 1e9)

    def record(name: str, seconds: float, bytes_per_param: int) -> None:
        bandwidth = bytes_per_param * numel / seconds
        result[name] = {"s": seconds, "gb_per_s": bandwidth / 1e9, "fraction_of_copy": bandwidth / copy_bandwidth}

    record("flat_lerp_fp32_source", cuda_seconds(lambda: flat_ema.lerp_(flat_src[torch.float32], 0.01)), 12)
    for dtype, width in ((torch.float32, 12), (torch.bfloat16, 10)):
        label = "fp32" if dtype == torch.float32 else "bf16"
        views = [t.view(s) for t, s in zip(flat_src[dtype].split([s.numel() for s in shapes]), shapes)]
        emas = [t.view(s) for t, s in zip(flat_ema.split([s.numel() for s in shapes]), shapes)]
        start = time.perf_counter()
        ema_update_(emas, views, 0.99)  # bf16: compiles here, once per list structure
        synchronize()
        result[f"ema_first_call_{label}_source_s"] = time.perf_counter() - start
        record(f"ema_update_{label}_source", cuda_seconds(lambda: ema_update_(emas, views, 0.99), warmup=0), width)
        record(f"ema_update_flat_{label}_source",
               cuda_seconds(lambda: ema_update_([flat_ema], [flat_src[dtype]], 0.99)), width)


def part_logprobs(ctx: Context, result: dict) -> None:
    """train.logprobs (vocab-parallel log-probs + entropy) at TP=1 against gathered logits (log_softmax):
    time and peak memory, forward, and forward + backward of the log-probs; the values must agree."""
    import torch

    from megatron_mgrpo.train.logprobs import vocab_parallel_logprobs_and_entropy

    tokens, vocab = ctx.sizes.logprob_tokens, ctx.sizes.model["vocab_size"]
    g = torch.Generator(ctx.device).manual_seed(0)
    logits = (torch.randn(tokens, vocab, device=ctx.device, generator=g) * 3).to(torch.bfloat16)
    targets = torch.randint(0, vocab, (tokens,), device=ctx.device, generator=g)

    def ours(backward: bool):
        leaf = logits.clone().requires_grad_(backward)
        logp, entropy = vocab_parallel_logprobs_and_entropy(leaf, targets, vocab)
        if backward:
            logp.sum().backward()
        return logp, entropy

    def gathered(backward: bool):
        leaf = logits.clone().requires_grad_(backward)
        logsoftmax = torch.log_softmax(leaf.float(), dim=-1)
        entropy = -(logsoftmax.exp() * logsoftmax).sum(-1).detach()
        logp = logsoftmax.gather(-1, targets[:, None]).squeeze(-1)
        if backward:
            logp.sum().backward()
        return logp, entropy

    (logp, entropy), (ref_logp, ref_entropy) = ours(False), gathered(False)
    result["max_abs_diff"] = {"logprobs": float((logp.float() - ref_logp).abs().max()),
                              "entropy": float((entropy.float().to(ref_entropy.device) - ref_entropy).abs().max())}
    result["entropy_device"] = str(entropy.device)
    del logp, entropy, ref_logp, ref_entropy
    for name, fn in (("ours", ours), ("gathered", gathered)):
        for backward in (False, True):
            key = f"{name}_{'fwd_bwd' if backward else 'fwd'}"
            with peak_memory(result, f"{key}_peak_gib"):
                result[f"{key}_s"] = cuda_seconds(lambda: fn(backward))
    result["shape"] = [tokens, vocab]


def part_export(ctx: Context, result: dict) -> None:
    """sync.export of the 1B Megatron bf16 model -> HFEngine.update_weights (in-process push, on the GPU)
    against a plain copy_ of the same tensors into the same engine tensors (the memcpy any push needs)."""
    import copy

    import torch

    from megatron_mgrpo.models.weight_map import checkpoint_tensors
    from megatron_mgrpo.rollout.hf_engine import HFEngine
    from megatron_mgrpo.sync.export import export_hf_weights

    class Tokenizer:
        eos_token_id, pad_token_id = 0, 0

    spec = ctx.spec()
    source = ctx.megatron_model(torch.bfloat16)
    engine = HFEngine(copy.deepcopy(ctx.hf_model()).to(torch.bfloat16), Tokenizer())
    version = iter(range(1, 1000))
    push_s = cuda_seconds(lambda: engine.update_weights(export_hf_weights(source.state_dict(), spec), next(version)))
    exported = dict(export_hf_weights(source.state_dict(), spec))
    targets = checkpoint_tensors(engine.model)
    with torch.no_grad():
        copy_s = cuda_seconds(lambda: [targets[n].copy_(t) for n, t in exported.items()])
    nbytes = sum(t.nbytes for t in exported.values())
    result.update(bytes=nbytes, push_s=push_s, copy_s=copy_s, push_over_copy=push_s / copy_s,
                  push_gb_per_s=nbytes / push_s / 1e9,
                  weights_equal=all(torch.equal(targets[n], t) for n, t in exported.items()))


def part_checkpoint(ctx: Context, result: dict) -> None:
    """train.checkpoint save and reload on CUDA of the policy (model, distributed optimizer, scheduler,
    momentum); reloaded weights must equal the saved ones. Also: parallel.cpu_compat is inactive."""
    import torch

    from megatron_mgrpo.parallel.cpu_compat import apply_cpu_compat
    from megatron_mgrpo.train.checkpoint import load_checkpoint, save_checkpoint

    result["cpu_compat_active"] = apply_cpu_compat()
    result["current_device"] = repr(torch.cuda.current_device())  # an index on CUDA; cpu_compat makes it "cpu"
    policy = ctx.policy()
    parts = dict(scheduler=policy.scheduler, momentum=policy.momentum.state_dict())
    # megatron's distributed optimizer has no state to save before its first step (it asserts): when
    # the train part did not get that far, the checkpoint goes without it and says so
    result["with_optimizer"] = policy.steps > 0
    if policy.steps > 0:
        parts["optimizer"] = policy.optimizer
    saved = {n: p.detach().clone() for n, p in policy.module.named_parameters()}
    with tempfile.TemporaryDirectory(prefix="gpu_check_ckpt_") as run_dir:  # not in $OUT: ~19 GB must not travel back
        start = time.perf_counter()
        path = save_checkpoint(run_dir, 1, policy.model, **parts)
        result["save_s"] = time.perf_counter() - start
        result["bytes_on_disk"] = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
        with torch.no_grad():
            for param in policy.module.parameters():
                param.zero_()
        start = time.perf_counter()
        load_checkpoint(path, policy.model, **parts)
        synchronize()
        result["load_s"] = time.perf_counter() - start
    result["weights_equal"] = all(torch.equal(saved[n], p) for n, p in policy.module.named_parameters())
    result["passed"] = result["weights_equal"] and result["cpu_compat_active"] != torch.cuda.is_available()


def part_pytest(ctx: Context, result: dict) -> None:
    """The project's single-process CUDA tests (`pytest -m cuda tests/cuda`), in a subprocess."""
    run = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "tests/cuda", "-q", "-p", "no:cacheprovider"],
                         cwd=REPO, capture_output=True, text=True, timeout=PYTEST_BUDGET - 5,
                         check=False)
    (ctx.out / "pytest.txt").write_text(run.stdout + run.stderr)
    result.update(returncode=run.returncode, summary=(run.stdout.strip().splitlines() or [""])[-1],
                  passed=run.returncode == 0)


PARTS = (
    Part("logits", 60, "1B Qwen3 HF -> Megatron on CUDA: bf16 / fp32 logits vs HF", part_logits),
    Part("train", 90, "MegatronPolicy.train_step bf16, 16 x 1024 tokens: tokens/s, MFU, peak memory", part_train),
    Part("logprobs", 25, "vocab-parallel log-probs + entropy vs gathered logits, 16k x 32k", part_logprobs),
    Part("export", 35, "export -> HFEngine.update_weights vs copy_ of the same bytes", part_export),
    Part("checkpoint", 110, "save + reload of model, optimizer, momentum on CUDA (~19 GB); cpu_compat off",
         part_checkpoint),
    Part("ema", 80, "ema_update_ vs flat lerp_ vs device copy, bf16 and fp32 sources (compiles once)", part_ema),
    Part("pytest", PYTEST_BUDGET, "pytest -m cuda tests/cuda", part_pytest),
)


# ---------------------------------------------------------------------------------------------- device run


def run_part(part: Part, ctx: Context) -> dict:
    """Run one part under its budget (SIGALRM): its result, or what it had when it failed, with the error."""
    result: dict = {}

    def expire(signum, frame):
        raise PartTimeout(f"over its budget of {part.budget_s} s")

    signal.signal(signal.SIGALRM, expire)
    signal.alarm(part.budget_s)
    start = time.perf_counter()
    try:
        part.run(ctx, result)
        status = "ok" if result.get("passed", True) else "failed"
    except Exception as err:  # noqa: BLE001 -- whatever fails in a part must not stop the others
        status = "timeout" if isinstance(err, PartTimeout) else "error"
        result["error"] = f"{type(err).__name__}: {err}"
        result["traceback"] = traceback.format_exc(limit=-8)
        log.error("%s: %s", part.name, result["error"])
    finally:
        signal.alarm(0)
    with contextlib.suppress(Exception):  # no CUDA: the smoke test
        import torch

        result["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return {"status": status, "seconds": round(time.perf_counter() - start, 2), **result}


def environment(how: str) -> dict:
    import torch

    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "python": sys.version.split()[0], "torch": torch.__version__,
            "cuda": torch.version.cuda, "wheels_installed_with": how,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (smoke test)",
            "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                         check=False).stdout.strip() or None,
            "modules": {m: module_location(m) for m in NEEDED_FROM_WHEELS + ON_DEVICE}}


def module_location(name: str) -> str | None:
    """Where `name` imports from (a namespace package such as megatron has no __init__), or None if missing."""
    spec = importlib.util.find_spec(name)
    if spec is None:
        return None
    return spec.origin or next(iter(spec.submodule_search_locations or []), "namespace package")


def init_process_group() -> str:
    """One process: gloo for CPU tensors, nccl for CUDA ones (gloo only without CUDA), then the
    project's init_distributed.

    init_distributed alone would give an nccl-only group (it skips creating one that exists);
    the project still builds a few small tensors on the CPU (e.g. the entropy sums in
    train.logprobs), and a CPU collective would stop a measurement instead of being a finding
    in the results (`entropy_device` in the logprobs part shows where the entropy lives).
    """
    import torch
    import torch.distributed as dist

    from megatron_mgrpo.parallel.dist import init_distributed, launch_from_env

    launch = launch_from_env()
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
                            rank=launch.rank, world_size=launch.world_size)
    init_distributed(tp=1, launch=launch)
    return backend


def device_run(out: Path, wheels: Path, only: list[str] | None, smoke: bool = False) -> int:
    """Install the wheels, set up one process, run the parts; 0 when every part ran and passed.

    `smoke`: on CPU, with the packages already installed and a tiny model (the kit's own test);
    without it a machine without CUDA is an error.
    """
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        handlers=[logging.StreamHandler(), logging.FileHandler(out / "log.txt")])
    results: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "parts": {}}
    path = out / "results.json"

    def save() -> None:
        path.write_text(json.dumps(results, indent=2, default=str))

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_wheels_") as target:
        if smoke:
            sys.path.insert(0, str(REPO))
            how = "none (smoke test: the installed packages)"
        else:
            how = install_wheels(wheels, Path(target))
        results["install_s"] = round(time.perf_counter() - started, 2)
        import torch

        if not (smoke or torch.cuda.is_available()):
            print("error: no CUDA device visible: on CPU run `python tools/gpu_check/run.py --dry-run`",
                  file=sys.stderr)
            return 2
        results["environment"] = environment(how)
        results["process_group"] = init_process_group()
        save()
        ctx = Context(out, SMOKE_SIZES if smoke else DEVICE_SIZES, "cpu" if smoke else "cuda")
        for part in PARTS:
            if only and part.name not in only:
                continue
            log.info("part %s (budget %d s): %s", part.name, part.budget_s, part.what)
            results["parts"][part.name] = run_part(part, ctx)
            log.info("part %s: %s in %.1f s", part.name, results["parts"][part.name]["status"],
                     results["parts"][part.name]["seconds"])
            save()
        results["total_s"] = round(time.perf_counter() - started, 1)
        save()
    print(json.dumps({name: r["status"] for name, r in results["parts"].items()}))
    return 0 if all(r["status"] == "ok" for r in results["parts"].values()) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="on CPU: check wheels, sizes and imports; print the plan")
    parser.add_argument("--smoke", action="store_true",
                        help="on CPU: run every part on a tiny model with the installed packages (the kit's test)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu_check_out"),
                        help="folder for results.json and log.txt (default: $OUT, else ./gpu_check_out)")
    parser.add_argument("--wheels", type=Path, default=WHEELS, help=f"wheel folder (default: {WHEELS})")
    parser.add_argument("--only", nargs="+", choices=[p.name for p in PARTS], help="run only these parts")
    args = parser.parse_args(argv)
    if args.dry_run:
        return dry_run(args.wheels)
    return device_run(args.out, args.wheels, args.only, smoke=args.smoke)


if __name__ == "__main__":
    sys.exit(main())
