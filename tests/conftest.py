"""Shared fixtures: tiny models and tokenizers built locally (there is no model hub here)."""


import pytest

from tests.helpers import char_tokenizer, tiny_qwen3


@pytest.fixture(scope="session")
def tokenizer():
    return char_tokenizer()


@pytest.fixture
def make_tiny_qwen3(tokenizer):
    return lambda seed=0: tiny_qwen3(len(tokenizer), seed=seed)
