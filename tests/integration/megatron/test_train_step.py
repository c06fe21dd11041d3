"""One train step under TP=2 / PP=2 / DP=2 equals TP=1: scores, loss, grad norm and updated weights
(real gloo processes); scores match the HF model; the sharded EMA equals an unsharded EMA."""

import pytest
import torch
import torch.multiprocessing as mp

from megatron_mgrpo.algo import policy_loss
from megatron_mgrpo.config import load_config
from megatron_mgrpo.parallel.ports import free_port
from megatron_mgrpo.train.batching import TrainSequences
from tests.helpers import tiny

TEMPERATURE = 1.1
MOMENTUM = 0.5  # large, so one EMA step moves the momentum copy visibly


def sequences(count: int = 8) -> TrainSequences:
    """`count` sequences of uneven prompt and response lengths, with advantages and engine log-probs;
    three responses per prompt (the policy shares a prompt among its responses' rows)."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 101, (3 + p,), generator=g).tolist() for p in range(-(-count // 3))]
    tokens, prompt_lengths, rollout, advantages = [], [], [], []
    for i in range(count):
        prompt, response = prompts[i // 3], 1 + (5 * i) % 9
        tokens.append(prompt + torch.randint(3, 101, (response,), generator=g).tolist())
        prompt_lengths.append(len(prompt))
        rollout.append((-torch.rand(response, generator=g) * 4).tolist())
        advantages.append(float(torch.randn((), generator=g)))
    return TrainSequences(tokens, prompt_lengths, {"rollout_logp": rollout}, {"advantage": advantages})


def objective(batch, logp):
    """The PPO-clip + TIS surrogate at token-mean, on-policy (old = current, detached)."""
    fields = batch.fields
    loss, stats = policy_loss(logp, logp.detach(), fields["advantage"], batch.response_mask,
                              rollout_logp=fields["rollout_logp"], tis_cap=2.0)
    return loss, int(batch.response_mask.sum()), {name: float(v) for name, v in stats.items()}


def config(tp: int, pp: int, prompt_sharing: str = "always"):
    return load_config(overrides=[f"parallel.tp={tp}", f"parallel.pp={pp}", "train.lr=0.01", "train.lr_warmup_steps=0",
                                  "train.lr_schedule=constant", "train.grad_clip=0.5", "train.micro_batch_tokens=40",
                                  f"algo.momentum={MOMENTUM}", "model.dtype=fp32",
                                  f"train.prompt_sharing={prompt_sharing}"])


def run_step(rank: int, world: int, tp: int, pp: int, port: int, results, count: int = 8,
             prompt_sharing: str = "always") -> None:
    from megatron.core import parallel_state as ps

    from megatron_mgrpo.models.hf_config import model_spec_from_hf
    from megatron_mgrpo.parallel.dist import Launch, destroy_distributed, init_distributed
    from megatron_mgrpo.train.policy import MegatronPolicy

    init_distributed(tp=tp, pp=pp, launch=Launch(rank, world, rank, "127.0.0.1", port))
    try:
        hf_model = tiny("qwen3")
        spec = model_spec_from_hf(hf_model.config, tp=tp)
        policy = MegatronPolicy(spec, hf_model.state_dict(), config(tp, pp, prompt_sharing), momentum=True)
        batch = sequences(count)
        rows = sum(len(micro.input_ids) for micro in policy._my_share(batch)[1])
        before = policy.score(batch, TEMPERATURE)
        metrics = policy.train_step(batch, objective, TEMPERATURE)
        after = policy.score(batch, TEMPERATURE)
        policy.update_momentum()
        momentum = policy.score(batch, TEMPERATURE, weights="momentum")
        exported = {"policy": dict(policy.hf_weights("policy")), "momentum": dict(policy.hf_weights("momentum"))}
        results[rank] = {"before": before, "after": after, "momentum": momentum, "metrics": metrics,
                         "weights": exported, "dp": ps.get_data_parallel_world_size(), "rows": rows,
                         "distance": policy.weight_distance("momentum")}
    finally:
        destroy_distributed()


def launch(tp: int, pp: int, world: int, count: int = 8, prompt_sharing: str = "always") -> dict:
    results = mp.Manager().dict()
    mp.start_processes(run_step, args=(world, tp, pp, free_port(), results, count, prompt_sharing), nprocs=world,
                       start_method="spawn")
    return dict(results)


def merged_weights(results: dict, which: str) -> dict[str, torch.Tensor]:
    merged = {}
    for result in results.values():
        for name, tensor in result["weights"][which].items():
            assert name not in merged or torch.equal(merged[name], tensor), name
            merged[name] = tensor
    return merged


@pytest.fixture(scope="module")
def reference():
    return launch(1, 1, 1)[0]


@pytest.mark.slow
def test_scores_match_hf_and_the_step_learns(reference):
    """Scored with prompts shared among responses, each response's log-probs are those of the HF
    model reading that sequence alone."""
    assert reference["rows"] < 8  # the 8 sequences were read in fewer rows: prompts were shared
    hf_model = tiny("qwen3").eval()
    batch = sequences()
    with torch.no_grad():
        for index, (tokens, prompt) in enumerate(zip(batch.tokens, batch.prompt_lengths)):
            logits = hf_model(input_ids=torch.tensor([tokens])).logits[0, prompt - 1:-1] / TEMPERATURE
            expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens[prompt:])[:, None])[:, 0]
            assert torch.allclose(reference["before"].logprobs[index], expected, atol=1e-5)
    metrics = reference["metrics"]
    assert metrics["grad_norm"] > 0 and metrics["lr"] == pytest.approx(0.01)
    # the step followed the advantages: the advantage-weighted log-likelihood went up
    advantages = batch.sequence_fields["advantage"]
    gain = sum(a * (after.sum() - before.sum()) for a, before, after in
               zip(advantages, reference["before"].logprobs, reference["after"].logprobs))
    assert gain > 0


@pytest.mark.slow
def test_a_step_with_shared_prompts_equals_one_without(reference):
    """Prompt sharing changes only how the sequences are laid out: scores, loss and gradient
    norm equal those of one row per sequence."""
    unshared = launch(1, 1, 1, prompt_sharing="never")[0]
    assert unshared["rows"] == 8 and reference["rows"] < 8
    for key in ("before", "after"):
        for got, want in zip(reference[key].logprobs + reference[key].entropy,
                             unshared[key].logprobs + unshared[key].entropy):
            assert torch.allclose(got, want, atol=1e-5), key
    for name in ("loss", "grad_norm", "tis_weight_mean"):
        assert reference["metrics"][name] == pytest.approx(unshared["metrics"][name], rel=1e-5), name


def test_sharded_ema_equals_unsharded_ema(reference):
    hf = tiny("qwen3").state_dict()
    policy, momentum = merged_weights({0: reference}, "policy"), merged_weights({0: reference}, "momentum")
    assert momentum.keys() == policy.keys()
    for name, updated in policy.items():
        expected = torch.lerp(hf[name].float(), updated, 1 - MOMENTUM)
        assert torch.allclose(momentum[name], expected, atol=1e-7), name
    # the anchor diagnostic ||theta - theta_momentum|| is the distance between the full weights
    full = torch.cat([(policy[name] - momentum[name]).flatten() for name in policy])
    assert reference["distance"] == pytest.approx(float(full.double().norm()), rel=1e-6) and reference["distance"] > 0
    # the momentum weights really are what a momentum-weights forward uses
    assert not all(torch.allclose(m, p) for m, p in zip(reference["momentum"].logprobs, reference["after"].logprobs))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("tp, pp, world", [(2, 1, 2), (1, 2, 2), (1, 1, 2)], ids=["TP=2", "PP=2", "DP=2"])
def test_parallel_step_equals_single_process(reference, tp, pp, world):
    results = launch(tp, pp, world)
    for result in results.values():
        for key in ("before", "after", "momentum"):
            for got, want in zip(result[key].logprobs, reference[key].logprobs):
                assert torch.allclose(got, want, atol=1e-5), key
            for got, want in zip(result[key].entropy, reference[key].entropy):
                assert torch.allclose(got, want, atol=1e-5), key
        for name in ("loss", "grad_norm", "clip_fraction", "tis_weight_mean"):
            assert result["metrics"][name] == pytest.approx(reference["metrics"][name], rel=1e-5, abs=1e-7), name
        # each shard counted once: TP duplicates (norms) on one rank, stages summed
        assert result["distance"] == pytest.approx(reference["distance"], rel=1e-4)
    # Adam's first update is lr * g / (|g| + eps): where a gradient is ~0, rounding-level differences
    # in it (other reduction orders) flip the update. So: nearly every element equal to 1e-6, and
    # none off by more than a small fraction of one learning-rate step.
    lr = reference["metrics"]["lr"]
    for which in ("policy", "momentum"):
        got, want = merged_weights(results, which), merged_weights({0: reference}, which)
        assert got.keys() == want.keys()
        diff = torch.cat([(got[name] - want[name]).abs().flatten() for name in want])
        assert diff.max() <= 0.05 * lr, which
        assert (diff > 1e-6).float().mean() < 1e-3, which


@pytest.mark.slow
@pytest.mark.distributed
def test_a_data_parallel_rank_without_sequences_still_steps():
    """One sequence over DP=2: rank 1 has nothing to train on, joins the reductions with zero
    gradients, and both ranks end with the single-process weights."""
    single, parallel = launch(1, 1, 1, count=1), launch(1, 1, 2, count=1)
    assert parallel[0]["metrics"]["loss"] == pytest.approx(single[0]["metrics"]["loss"], rel=1e-5)
    want = merged_weights(single, "policy")
    for rank in (0, 1):
        got = parallel[rank]["weights"]["policy"]
        if got:  # only global rank 0 yields the export
            assert all(torch.allclose(got[name], want[name], atol=1e-6) for name in want)


def _resume(rank: int, world: int, port: int, run_dir: str, results) -> None:
    from megatron_mgrpo.models.hf_config import model_spec_from_hf
    from megatron_mgrpo.parallel.dist import Launch, destroy_distributed, init_distributed
    from megatron_mgrpo.train.checkpoint import load_checkpoint, save_checkpoint
    from megatron_mgrpo.train.policy import MegatronPolicy

    init_distributed(launch=Launch(rank, world, rank, "127.0.0.1", port))
    try:
        hf_model, batch = tiny("qwen3"), sequences()
        spec = model_spec_from_hf(hf_model.config)
        straight = MegatronPolicy(spec, hf_model.state_dict(), config(1, 1))
        for _ in range(2):
            straight.train_step(batch, objective)
        path = save_checkpoint(run_dir, 2, [straight.model], optimizer=straight.optimizer,
                               scheduler=straight.scheduler, momentum=straight.momentum.state_dict())
        resumed = MegatronPolicy(spec, hf_model.state_dict(), config(1, 1))
        load_checkpoint(path, [resumed.model], optimizer=resumed.optimizer, scheduler=resumed.scheduler,
                        momentum=resumed.momentum.state_dict())
        for policy in (straight, resumed):
            for _ in range(2):
                policy.train_step(batch, objective)
        results["equal"] = all(torch.equal(a, b) for a, b in zip(straight.module.parameters(),
                                                                  resumed.module.parameters()))
    finally:
        destroy_distributed()


@pytest.mark.slow
def test_training_resumed_from_a_checkpoint_equals_uninterrupted_training(tmp_path):
    """Bit for bit, two steps after the load: Adam's moments, step counts and the LR schedule all resume."""
    results = mp.Manager().dict()
    mp.start_processes(_resume, args=(1, free_port(), str(tmp_path), results), nprocs=1, start_method="spawn")
    assert results["equal"]


def _step_save_then_step(rank: int, world: int, tp: int, port: int, run_dir: str, load: bool, results) -> None:
    """One step (or a load of the checkpoint another layout saved after it), then the next step."""
    from megatron_mgrpo.models.hf_config import model_spec_from_hf
    from megatron_mgrpo.parallel.dist import Launch, destroy_distributed, init_distributed
    from megatron_mgrpo.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from megatron_mgrpo.train.policy import MegatronPolicy

    init_distributed(tp=tp, launch=Launch(rank, world, rank, "127.0.0.1", port))
    try:
        hf_model, batch = tiny("qwen3"), sequences()
        policy = MegatronPolicy(model_spec_from_hf(hf_model.config, tp=tp), hf_model.state_dict(), config(tp, 1))
        state = dict(optimizer=policy.optimizer, scheduler=policy.scheduler, momentum=policy.momentum.state_dict())
        if load:
            load_checkpoint(latest_checkpoint(run_dir), [policy.model], **state)
        else:
            policy.train_step(batch, objective)
            save_checkpoint(run_dir, 1, [policy.model], **state)
        results[rank] = policy.train_step(batch, objective)
    finally:
        destroy_distributed()


@pytest.mark.slow
@pytest.mark.distributed
def test_checkpoint_saved_at_tp2_resumes_at_tp1_with_the_same_next_step(tmp_path):
    saved, resumed = mp.Manager().dict(), mp.Manager().dict()
    mp.start_processes(_step_save_then_step, args=(2, 2, free_port(), str(tmp_path), False, saved), nprocs=2,
                       start_method="spawn")
    mp.start_processes(_step_save_then_step, args=(1, 1, free_port(), str(tmp_path), True, resumed), nprocs=1,
                       start_method="spawn")
    for name in ("loss", "grad_norm", "lr"):
        assert resumed[0][name] == pytest.approx(saved[0][name], rel=1e-5), name
