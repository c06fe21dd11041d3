"""Shared fixtures: tiny models and tokenizers built locally (there is no model hub here)."""

import string

import pytest
import torch


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


@pytest.fixture(scope="session")
def tokenizer():
    return char_tokenizer()


@pytest.fixture
def make_tiny_qwen3(tokenizer):
    return lambda seed=0: tiny_qwen3(len(tokenizer), seed=seed)
