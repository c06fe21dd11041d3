"""MoE (Qwen3-MoE, Mixtral) on megatron-core with real gloo processes: logits vs HF under TP, PP
and EP, routing replay, and the HF weight export with every expert."""

import pytest
import torch
import torch.multiprocessing as mp

from megatron_mgrpo.parallel.ports import free_port
from tests.helpers import tiny
from tests.integration.megatron.test_logits_vs_hf import check_logits

MOE_MODELS = (("qwen3_moe", False), ("qwen3_moe_unnormed", False), ("mixtral", False))
LAYOUTS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2)]  # (tp, pp, ep)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("tp, pp, ep", LAYOUTS)
def test_moe_logits_match_hf(tp, pp, ep):
    world = tp * pp * ep
    mp.start_processes(check_logits, args=(world, tp, pp, free_port(), ep, MOE_MODELS), nprocs=world,
                       start_method="spawn")


def _routing_by_layer(model) -> tuple[dict, list]:
    """Forward hooks that keep each router's routing map ([tokens, experts] booleans) per layer."""
    from megatron.core.transformer.moe.router import TopKRouter

    maps = {}

    def keep(router, inputs, output):
        maps[router.layer_number - 1] = output[1].clone()

    hooks = [m.register_forward_hook(keep) for m in model.modules() if isinstance(m, TopKRouter)]
    return maps, hooks


def _chosen(routing_map: torch.Tensor) -> torch.Tensor:
    """The sorted expert ids per token of a routing map."""
    return torch.stack([row.nonzero().flatten() for row in routing_map])


def check_routing_replay(rank: int, world: int, port: int) -> None:
    from megatron_mgrpo.models.hf_config import model_spec_from_hf
    from megatron_mgrpo.models.provider import build_gpt_model, load_hf_weights
    from megatron_mgrpo.parallel.dist import Launch, destroy_distributed, init_distributed
    from megatron_mgrpo.train.routing_replay import RoutingReplay

    init_distributed(launch=Launch(rank, world, rank, "127.0.0.1", port))
    try:
        hf_model = tiny("qwen3_moe")
        spec = model_spec_from_hf(hf_model.config)
        model = build_gpt_model(spec, routing_replay=True)
        load_hf_weights(model, hf_model.state_dict(), spec)
        replay = RoutingReplay(model)
        assert sorted(replay.layers) == [0, 1]
        ids = torch.randint(0, 101, (2, 24), generator=torch.Generator().manual_seed(1))
        positions = torch.arange(24)[None].expand(2, 24)
        maps, hooks = _routing_by_layer(model)

        def forward_backward():
            model.zero_grad()
            logits = model(ids, positions, attention_mask=None)
            logits.float().square().mean().backward()
            router_grad = model.decoder.layers[0].mlp.router.weight.grad.clone()
            return logits.detach(), {k: _chosen(v) for k, v in maps.items()}, router_grad

        replay.record()
        recorded_logits, recorded_choice, recorded_grad = forward_backward()
        routed = replay.recorded()
        replay.clear()
        assert routed[0].shape == (2 * 24, 2) and routed[0].dtype == torch.int64
        for layer, choice in recorded_choice.items():
            assert torch.equal(choice, routed[layer].sort(dim=1).values)

        with replay.replaying([routed[0], routed[1]]):  # the same router: replay changes nothing
            logits, choice, grad = forward_backward()
        assert torch.equal(logits, recorded_logits) and torch.equal(grad, recorded_grad)

        with torch.no_grad():  # another router: other experts, unless replayed
            for layer in model.decoder.layers:
                layer.mlp.router.weight.normal_(generator=torch.Generator().manual_seed(7))
        free_logits, free_choice, _ = forward_backward()
        assert not torch.equal(free_choice[0], recorded_choice[0])
        assert (free_logits - recorded_logits).abs().max() > 1e-2
        with replay.replaying(routed):
            replayed_logits, replayed_choice, replayed_grad = forward_backward()
        for layer in routed:
            assert torch.equal(replayed_choice[layer], recorded_choice[layer])
        assert replayed_grad.abs().sum() > 0  # the router still learns through its probabilities
        assert not torch.equal(replayed_logits, free_logits)
        # cleared: the next forward routes freely again
        _, after_choice, _ = forward_backward()
        assert torch.equal(after_choice[0], free_choice[0])
        for hook in hooks:
            hook.remove()
        replay.release()
        with pytest.raises(ValueError, match=r"routed experts for layers \[1\] are missing"):
            replay.replay([routed[0]])
    finally:
        destroy_distributed()


@pytest.mark.slow
@pytest.mark.distributed
def test_routing_replay_imposes_recorded_experts():
    mp.start_processes(check_routing_replay, args=(1, free_port()), nprocs=1, start_method="spawn")


def check_export(rank: int, world: int, tp: int, pp: int, ep: int, port: int) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_mgrpo.models.hf_config import model_spec_from_hf
    from megatron_mgrpo.models.provider import build_gpt_model, load_hf_weights
    from megatron_mgrpo.models.weight_map import checkpoint_layout
    from megatron_mgrpo.parallel.dist import Launch, destroy_distributed, init_distributed
    from megatron_mgrpo.sync.export import export_hf_weights

    init_distributed(tp=tp, pp=pp, ep=ep, launch=Launch(rank, world, rank, "127.0.0.1", port))
    try:
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        for kind in ("qwen3_moe", "mixtral"):
            reference = tiny(kind)
            spec = model_spec_from_hf(reference.config, tp=tp)
            model = build_gpt_model(spec, tp=tp, pp=pp, ep=ep, pre_process=pp_rank == 0,
                                    post_process=pp_rank == pp - 1)
            load_hf_weights(model, reference.state_dict(), spec)
            exported = dict(export_hf_weights(model.state_dict(), spec, collect_stages=True))
            counts = [None] * world
            dist.all_gather_object(counts, len(exported))
            expected = checkpoint_layout(reference.state_dict(), spec)
            assert counts == [len(expected)] + [0] * (world - 1), counts  # rank 0 alone yields, everything
            if rank == 0:
                assert exported.keys() == expected.keys()
                for name, tensor in expected.items():
                    assert torch.equal(exported[name], tensor), name
                assert sum(".experts." in name for name in exported) == spec.num_layers * spec.num_experts * 3
    finally:
        destroy_distributed()


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("tp, pp, ep", [(2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 2)])
def test_moe_export_is_exact_with_every_expert(tp, pp, ep):
    world = tp * pp * ep
    mp.start_processes(check_export, args=(world, tp, pp, ep, free_port()), nprocs=world, start_method="spawn")


class _IdTokenizer:
    """Enough of a tokenizer for the in-process engine: token ids as text, id 1 ends a response."""

    eos_token_id, pad_token_id = 1, 0

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def check_engine_routing_is_replayed(rank: int, world: int, pp: int, ep: int, port: int) -> None:
    """The in-process engine records every position's experts, and the Megatron policy's forward
    uses exactly those (on its pipeline stage's layers, its data-parallel share of the sequences,
    with experts split over EP ranks), not the ones its own router prefers."""
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_mgrpo.config import load_config
    from megatron_mgrpo.models.hf_config import model_spec_from_hf
    from megatron_mgrpo.parallel.dist import Launch, destroy_distributed, init_distributed
    from megatron_mgrpo.rollout.hf_engine import HFEngine
    from megatron_mgrpo.rollout.types import SamplingParams
    from megatron_mgrpo.train.batching import TrainSequences, data_parallel_share
    from megatron_mgrpo.train.policy import MegatronPolicy

    init_distributed(pp=pp, ep=ep, launch=Launch(rank, world, rank, "127.0.0.1", port))
    try:
        hf_model = tiny("qwen3_moe").eval()
        engine = HFEngine(hf_model, _IdTokenizer(), routed_experts=True)
        samples = engine.generate([[5, 6, 7], [9, 10, 11, 12, 13], [20]], n=2,
                                  sampling=SamplingParams(max_new_tokens=6, seed=0))
        for s in samples:  # every position but the last, as a teacher-forced forward routes it
            with torch.no_grad():
                out = hf_model(input_ids=torch.tensor([s.prompt_ids + s.response_ids]), output_router_logits=True)
            assert len(s.routed_experts) == len(out.router_logits) == 2
            for layer, logits in zip(s.routed_experts, out.router_logits):
                assert layer.dtype == torch.int32
                assert torch.equal(layer.long().sort(-1).values, logits.topk(2).indices[:-1].sort(-1).values)

        cfg = load_config(overrides=["train.routing_replay=true", "model.dtype=fp32", f"parallel.pp={pp}",
                                     f"parallel.ep={ep}", "train.micro_batch_tokens=30"])
        policy = MegatronPolicy(model_spec_from_hf(hf_model.config), hf_model.state_dict(), cfg, momentum=False)
        routers = [m for m in policy.module.modules() if isinstance(m, TopKRouter)]
        with torch.no_grad():  # a router that prefers other experts than the engine's
            for router in routers:
                router.weight.normal_(generator=torch.Generator().manual_seed(7))
        seen = []
        hooks = [r.register_forward_hook(lambda router, _, out: seen.append((router.layer_number - 1, out[1])))
                 for r in routers]
        sequences = TrainSequences([s.prompt_ids + s.response_ids for s in samples],
                                   [len(s.prompt_ids) for s in samples],
                                   routing=[s.routed_experts for s in samples])

        def chosen_per_sequence():
            """(sequence, layer) -> the experts the policy's forward used at each engine-routed position."""
            out, maps = {}, iter(list(seen))
            share, batches = policy._my_share(sequences)  # with EP=2: padded to the other rank's plan
            for batch in batches:
                width, rows = batch.input_ids.shape[1], batch.input_ids.shape[0]
                for _ in routers:
                    layer, routing_map = next(maps)
                    ids = _chosen(routing_map).view(width, rows, 2)
                    for k, index in enumerate(batch.indices):
                        # a row may hold several responses to one prompt: the prompt's positions, then
                        # those of this response's tokens but the last (they predict its tokens 1..)
                        tokens, prompt = sequences.tokens[share[index]], sequences.prompt_lengths[share[index]]
                        source = batch.source[k, :len(tokens) - prompt]
                        positions = list(range(prompt)) + (source[1:] % width).tolist()
                        out[share[index], layer] = ids[positions, int(source[0]) // width]
            seen.clear()
            return out

        if ep == 1:  # the two samples of a prompt share a row (with EP=2 each rank has one of them)
            assert sum(len(batch.input_ids) for batch in policy._my_share(sequences)[1]) < len(samples)
        policy.score(sequences)
        replayed = chosen_per_sequence()
        assert len(replayed) == len(data_parallel_share(len(samples), policy.dp_rank, policy.dp_size)) * len(routers)
        for (index, layer), ids in replayed.items():
            assert torch.equal(ids, samples[index].routed_experts[layer].long().sort(-1).values)

        policy.replay, replay = None, policy.replay  # the same forward routing freely differs
        policy.score(sequences)
        policy.replay = replay
        free = chosen_per_sequence()
        assert any(not torch.equal(free[key], replayed[key]) for key in replayed)
        for hook in hooks:
            hook.remove()

        with pytest.raises(ValueError, match="carry no routed experts"):
            policy.score(TrainSequences(sequences.tokens, sequences.prompt_lengths))
    finally:
        destroy_distributed()


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("pp, ep", [(1, 1), (2, 1), (1, 2)], ids=["PP=1", "PP=2", "EP=2"])
def test_engine_routing_is_replayed_by_the_policy(pp, ep):
    world = pp * ep  # EP=2 also means two data-parallel ranks, each scoring its own share
    mp.start_processes(check_engine_routing_is_replayed, args=(world, pp, ep, free_port()), nprocs=world,
                       start_method="spawn")
