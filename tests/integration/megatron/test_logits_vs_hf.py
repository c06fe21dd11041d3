"""HF -> Megatron logits match the HF model, with real gloo processes (TP=1, TP=2, PP=2)."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_mgrpo.parallel.ports import free_port
from tests.helpers import tiny

# (architecture, tied embeddings): Llama with Llama-3 RoPE scaling, Qwen2 (qkv bias), Qwen3 (q/k norm)
MODELS = (("llama3", False), ("qwen2", False), ("qwen3", False), ("qwen3", True))
SEQ_LEN = 48  # long enough for the rescaled Llama-3 RoPE frequencies to move the logits


def full_logits(model, ids, positions, pp: int) -> torch.Tensor | None:
    """Vocab-gathered logits on the last pipeline stage (None elsewhere)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, model):
        return model(ids, positions, attention_mask=None), lambda output, non_loss_data=True: output

    with torch.no_grad():
        if pp == 1:
            local = model(ids, positions, attention_mask=None)
        else:  # through megatron's pipeline schedule, as training will run it
            outputs = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter([None]), model=[model], num_microbatches=1,
                seq_length=ids.shape[1], micro_batch_size=ids.shape[0], forward_only=True, collect_non_loss_data=True)
            if not parallel_state.is_pipeline_last_stage():
                return None
            local = outputs[0]
    tp = parallel_state.get_tensor_model_parallel_world_size()
    shards = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(shards, local.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(shards, dim=-1)


def check_logits(rank: int, world: int, tp: int, pp: int, port: int, ep: int = 1, models=MODELS) -> None:
    from megatron.core import parallel_state

    from megatron_mgrpo.models.hf_config import model_spec_from_hf
    from megatron_mgrpo.models.provider import build_gpt_model, load_hf_weights
    from megatron_mgrpo.parallel.dist import Launch, destroy_distributed, init_distributed

    init_distributed(tp=tp, pp=pp, ep=ep, launch=Launch(rank, world, rank, "127.0.0.1", port))
    try:
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        ids = torch.randint(0, 101, (2, SEQ_LEN), generator=torch.Generator().manual_seed(0))
        positions = torch.arange(SEQ_LEN)[None].expand(2, SEQ_LEN)
        for kind, tied in models:
            hf_model = tiny(kind, tied=tied).eval()
            spec = model_spec_from_hf(hf_model.config, tp=tp)
            model = build_gpt_model(spec, tp=tp, pp=pp, ep=ep, pre_process=pp_rank == 0,
                                    post_process=pp_rank == pp - 1)
            load_hf_weights(model.eval(), hf_model.state_dict(), spec)
            logits = full_logits(model, ids, positions, pp)
            if logits is None:
                continue
            assert logits.shape[-1] == spec.padded_vocab_size
            with torch.no_grad():
                diff = (logits[..., :spec.vocab_size] - hf_model(input_ids=ids).logits).abs().max().item()
            name = f"{kind}{' tied' if tied else ''} TP={tp} PP={pp} EP={ep}"
            print(f"{name}: max |logits - HF| = {diff:.2e}")
            assert diff <= 1e-4, f"{name}: max |logits - HF| = {diff}"
    finally:
        destroy_distributed()


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (1, 2)])
def test_megatron_logits_match_hf(tp, pp):
    mp.start_processes(check_logits, args=(tp * pp, tp, pp, free_port()), nprocs=tp * pp, start_method="spawn")
