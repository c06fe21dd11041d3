"""Helpers shared by test modules: tiny models and tokenizers built locally (there is no model
hub here), the trainer's small end-to-end settings and how to run them, teacher-forced log-probs."""

import os
import signal
import string
import subprocess
import sys
import time

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from megatron_mgrpo.parallel.ports import free_port

# ------------------------------------------------------------------------------------- models

def char_tokenizer():
    """A character-level fast tokenizer with <pad>, <eos> and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list(string.digits + string.ascii_letters + " +-*/=()[]{}\\.,:;?!^_'\"\n")
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def tiny_qwen3(vocab_size: int, seed: int = 0, eos_token_id: int = 1, head_dim: int = 16):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=512,
                         tie_word_embeddings=False, eos_token_id=eos_token_id, pad_token_id=0)
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config).eval()


# initializer_range 0.1 (HF default 0.02) sharpens attention, so a mapping error in q / k or RoPE moves
# the logits by far more than the 1e-4 the integration tests allow (Llama-3 scaling left out: 1e-2)
COMMON = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1)


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_theta": 1e6}


#: 2 MoE layers of 4 experts, top-2; expert intermediate 32 (Qwen3-MoE) / 96 (Mixtral, from COMMON)
MOE = dict(COMMON, num_hidden_layers=2, num_experts_per_tok=2)


def tiny(kind: str, tied: bool = False):
    """A small random HF model; "llama3" is Llama with Llama-3 RoPE scaling (base 1e6: at 16
    channels a third of the frequencies are rescaled, which moves logits within ~50 tokens);
    "qwen3_moe" renormalises the top-k router probabilities as released Qwen3-MoE models do,
    "qwen3_moe_unnormed" does not (norm_topk_prob=False)."""
    torch.manual_seed(0)
    if kind.startswith("qwen3_moe"):
        return Qwen3MoeForCausalLM(Qwen3MoeConfig(**MOE, head_dim=16, num_experts=4, moe_intermediate_size=32,
                                                  norm_topk_prob=kind == "qwen3_moe", tie_word_embeddings=tied))
    if kind == "mixtral":
        return MixtralForCausalLM(MixtralConfig(**MOE, num_local_experts=4, tie_word_embeddings=tied))
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**COMMON, tie_word_embeddings=tied))
    if kind == "llama3":
        config = LlamaConfig(**{**COMMON, "max_position_embeddings": 16384}, rope_scaling=LLAMA3_ROPE,
                             tie_word_embeddings=tied)
        return LlamaForCausalLM(config)
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**COMMON, tie_word_embeddings=tied))
    return Qwen3ForCausalLM(Qwen3Config(**COMMON, head_dim=16, tie_word_embeddings=tied))


def teacher_forced_logprobs(model, sample, temperature):
    """Log-probs of the response tokens from one full forward, no cache, no padding."""
    ids = torch.tensor([sample.prompt_ids + sample.response_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(sample.prompt_ids) - 1:-1].float()
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    return logprobs.gather(-1, torch.tensor(sample.response_ids)[:, None]).squeeze(-1)


# ------------------------------------------------------------------------- the trainer end to end

SMALL = ["train.steps=2", "train.prompts_per_step=4", "rollout.group_size=6", "rollout.momentum_samples=2",
         "rollout.max_new_tokens=8", "warmstart.steps=30", "eval.prompts=8", "eval.interval=1",
         "checkpoint.interval=1", "log.wandb=disabled", "train.lr_schedule=constant", "data.builtin_size=64",
         "warmstart.size=500", "reward.ttrl_train_samples=4"]


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """A fresh cache shared by this module's runs (the tiny model and its warm start are built once)."""
    path = tmp_path_factory.mktemp("cache")
    os.environ["MGRPO_CACHE"] = str(path)
    yield path
    os.environ.pop("MGRPO_CACHE")


def run_cli(out, *overrides, check=True):
    env = {**os.environ, "MASTER_PORT": str(free_port())}
    return subprocess.run([sys.executable, "-m", "megatron_mgrpo.cli", "train", "--out", str(out), *SMALL,
                           *overrides], env=env, capture_output=True, text=True, check=check, timeout=900)


def killed_after_checkpoint(out, overrides, step: int) -> bool:
    """`mgrpo train` into `out`, killed with SIGKILL (its whole process group) as soon as the
    checkpoint of `step` is complete; whether that checkpoint was there."""
    env = {**os.environ, "MASTER_PORT": str(free_port())}
    command = [sys.executable, "-m", "megatron_mgrpo.cli", "train", "--out", str(out), *SMALL, *overrides]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    marker = out / "checkpoints" / f"step_{step:06d}" / "complete.json"
    deadline = time.time() + 600
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return marker.exists()
