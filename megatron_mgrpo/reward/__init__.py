"""Answer extraction, equivalence, voting and label sources."""

from megatron_mgrpo.answer_format import extract_answer
from megatron_mgrpo.reward.equivalence import AnswerGrader, GraderStats, canonical_form
from megatron_mgrpo.reward.labels import LabelResult, PromptGroup, make_label_source, pseudo_label_accuracy
from megatron_mgrpo.reward.voting import Vote, vote

__all__ = ["AnswerGrader", "GraderStats", "LabelResult", "PromptGroup", "Vote", "canonical_form",
           "extract_answer", "make_label_source", "pseudo_label_accuracy", "vote"]
