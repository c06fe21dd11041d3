"""The embedded default model: a loadable HF directory whose tokenizer covers the built-in tasks."""

import os

import pytest
import torch

from megatron_mgrpo.config import ConfigError
from megatron_mgrpo.data.synthetic import TASKS, synthetic_prompts
from megatron_mgrpo.data.templates import PromptTemplate
from megatron_mgrpo.models.builtin import (
    BUILTINS,
    build_tokenizer,
    default_cache_dir,
    materialize_builtin,
    resolve_model_path,
)


@pytest.fixture(scope="module")
def builtin_dir(tmp_path_factory):
    return materialize_builtin("tiny-qwen3", tmp_path_factory.mktemp("cache"))


def test_loads_as_a_normal_hf_directory(builtin_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(builtin_dir)
    tokenizer = AutoTokenizer.from_pretrained(builtin_dir)
    spec = BUILTINS["tiny-qwen3"]
    assert model.config.model_type == "qwen3" and not model.config.tie_word_embeddings
    assert model.config.head_dim == spec.head_dim >= 32
    assert model.config.vocab_size == len(tokenizer)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    logits = model(torch.tensor([tokenizer("1+2=", add_special_tokens=False)["input_ids"]])).logits
    assert logits.shape[-1] == len(tokenizer) and torch.isfinite(logits).all()


def test_weights_are_seeded(builtin_dir, tmp_path):
    from safetensors.torch import load_file

    again = materialize_builtin("tiny-qwen3", tmp_path)
    first, second = load_file(builtin_dir / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_cached_directory_is_reused(builtin_dir):
    stamp = os.stat(builtin_dir / "model.safetensors").st_mtime_ns
    assert materialize_builtin("tiny-qwen3", builtin_dir.parent.parent) == builtin_dir
    assert os.stat(builtin_dir / "model.safetensors").st_mtime_ns == stamp
    assert [p.name for p in builtin_dir.parent.iterdir()] == [builtin_dir.name]  # no staging left over


@pytest.mark.parametrize("task", sorted(TASKS))
def test_tokenizer_round_trips_every_task_prompt_and_answer(builtin_dir, task):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(builtin_dir)
    records = synthetic_prompts(task, 300, seed=0)
    template = PromptTemplate(tokenizer, "chat", few_shot=2, examples=records)
    for record in records:
        text = template.render(record) + f"\\boxed{{{record.gold_answer}}}"
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids, text
        assert tokenizer.decode(ids) == text


def test_boxed_is_one_token_and_eos_ends_a_chat_turn():
    tokenizer = build_tokenizer()
    ids = tokenizer("\\boxed{12}", add_special_tokens=False)["input_ids"]
    assert len(ids) == 5
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}],
                                         tokenize=False)
    assert tokenizer.eos_token + "\n" in chat
    assert tokenizer.decode(tokenizer(chat, add_special_tokens=False)["input_ids"], skip_special_tokens=True) == \
        "user\n1+1\nassistant\n2\n"


def test_cache_dir_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MGRPO_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("MGRPO_CACHE")
    assert default_cache_dir().parts[-2:] == (".cache", "megatron_mgrpo")


def test_bad_names_and_paths_say_what_to_pass(tmp_path):
    with pytest.raises(ConfigError, match="builtin:tiny-qwen3"):
        materialize_builtin("tiny-llama", tmp_path)
    with pytest.raises(ConfigError, match="no config.json"):
        resolve_model_path(tmp_path)
