"""Prompt data: records, datasets, templates, built-in synthetic tasks, preprocessing."""

from megatron_mgrpo.data.datasets import PromptSet, load_prompts, load_prompts_from_config
from megatron_mgrpo.data.records import BadRow, DataError, FieldMap, PromptRecord
from megatron_mgrpo.data.synthetic import synthetic_prompts
from megatron_mgrpo.data.templates import PromptTemplate

__all__ = ["BadRow", "DataError", "FieldMap", "PromptRecord", "PromptSet", "PromptTemplate", "load_prompts",
           "load_prompts_from_config", "synthetic_prompts"]
