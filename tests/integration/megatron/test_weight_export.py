"""Megatron TP=2 -> HF-named tensors -> buckets -> engine, with real gloo processes."""

import pytest
import torch
import torch.multiprocessing as mp

from megatron_mgrpo.parallel.ports import free_port
from tests.helpers import tiny


def export_and_push(rank: int, world: int, port: int) -> None:
    from megatron.core import parallel_state

    from megatron_mgrpo.models.hf_config import model_spec_from_hf
    from megatron_mgrpo.models.provider import build_gpt_model
    from megatron_mgrpo.models.weight_map import hf_to_megatron
    from megatron_mgrpo.parallel.dist import Launch, destroy_distributed, init_distributed
    from megatron_mgrpo.rollout import SamplingParams
    from megatron_mgrpo.rollout.hf_engine import HFEngine
    from megatron_mgrpo.sync.buckets import bucketize, unbucketize
    from megatron_mgrpo.sync.export import export_hf_weights

    init_distributed(tp=world, launch=Launch(rank, world, rank, "127.0.0.1", port))
    try:
        reference = tiny("qwen3").eval()
        spec = model_spec_from_hf(reference.config, tp=world)
        model = build_gpt_model(spec, tp=world)
        model.load_state_dict(hf_to_megatron(reference.state_dict(), spec, tp_rank=rank, tp_size=world), strict=False)
        exported = dict(export_hf_weights(model.state_dict(), spec))
        momentum = dict(export_hf_weights({n: t * 0.5 for n, t in model.state_dict().items()
                                           if not n.endswith("_extra_state")}, spec))
        if parallel_state.get_tensor_model_parallel_rank() != 0:
            assert exported == {} and momentum == {}  # only the sending rank yields
            return
        expected = reference.state_dict()
        assert exported.keys() == expected.keys()
        for name, tensor in expected.items():
            assert torch.equal(exported[name], tensor), name
            assert torch.equal(momentum[name], tensor * 0.5), name
        # push into an engine that holds other weights: afterwards it samples from the Megatron model
        engine = HFEngine(tiny("qwen3").eval(), tokenizer=_Tokenizer())
        with torch.no_grad():
            for p in engine.model.parameters():
                p.add_(1.0)
        engine.update_weights(unbucketize(bucketize(exported.items(), version=4, bucket_bytes=4096), version=4),
                              version=4)
        prompt = [5, 9, 13, 2]
        for s in engine.generate([prompt], n=3, sampling=SamplingParams(max_new_tokens=6)):
            ids = torch.tensor([s.prompt_ids + s.response_ids])
            with torch.no_grad():
                logp = torch.log_softmax(reference(input_ids=ids).logits[0, len(prompt) - 1:-1], -1)
            expected_lp = logp.gather(-1, torch.tensor(s.response_ids)[:, None]).squeeze(-1)
            assert torch.allclose(torch.tensor(s.logprobs), expected_lp, atol=1e-5)
            assert s.weights_version == 4
    finally:
        destroy_distributed()


class _Tokenizer:
    eos_token_id, pad_token_id = None, 0

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


@pytest.mark.slow
@pytest.mark.distributed
def test_tp2_export_is_exact_and_feeds_an_engine():
    mp.start_processes(export_and_push, args=(2, free_port()), nprocs=2, start_method="spawn")
