"""HF -> Megatron logits match the HF model, with real gloo processes (TP=1 and TP=2)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_mgrpo.rollout.server import free_port
from tests.unit.models.test_weight_map import tiny

KINDS = ("llama", "qwen2", "qwen3")


def check_logits(rank: int, world: int, tp: int, port: int) -> None:
    from megatron.core import parallel_state

    from megatron_mgrpo.models.hf_config import model_spec_from_hf
    from megatron_mgrpo.models.provider import build_gpt_model
    from megatron_mgrpo.models.weight_map import hf_to_megatron
    from megatron_mgrpo.parallel.dist import Launch, destroy_distributed, init_distributed

    init_distributed(tp=tp, launch=Launch(rank, world, rank, "127.0.0.1", port))
    try:
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(0))
        positions = torch.arange(9)[None].expand(2, 9)
        for kind in KINDS:
            hf_model = tiny(kind).eval()
            spec = model_spec_from_hf(hf_model.config, tp=tp)
            model = build_gpt_model(spec, tp=tp).eval()
            missing, unexpected = model.load_state_dict(
                hf_to_megatron(hf_model.state_dict(), spec, tp_rank=tp_rank, tp_size=tp), strict=False)
            assert not unexpected and all(name.endswith("_extra_state") for name in missing), (missing, unexpected)
            with torch.no_grad():
                local = model(ids, positions, attention_mask=None)
                shards = [torch.empty_like(local) for _ in range(tp)]
                dist.all_gather(shards, local.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
                logits = torch.cat(shards, dim=-1)[..., :spec.vocab_size]
                reference = hf_model(input_ids=ids).logits
            diff = (logits - reference).abs().max().item()
            print(f"{kind} TP={tp} rank {rank}: max |logits - HF| = {diff:.2e}")
            assert diff <= 1e-4, f"{kind} TP={tp}: max |logits - HF| = {diff}"
    finally:
        destroy_distributed()


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("tp", [1, 2])
def test_megatron_logits_match_hf(tp):
    mp.start_processes(check_logits, args=(tp, tp, free_port()), nprocs=tp, start_method="spawn")
