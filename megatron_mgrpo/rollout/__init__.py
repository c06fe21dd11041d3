"""Rollout engines: everything that samples responses and reports their log-probs.

`RolloutEngine` is the one interface the trainer sees; `HFEngine` runs in-process, server
engines (vLLM, SGLang) talk HTTP to separately launched servers.
"""

from megatron_mgrpo.rollout.types import RolloutEngine, Sample, SamplingParams

__all__ = ["RolloutEngine", "Sample", "SamplingParams"]
