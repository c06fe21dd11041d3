import pytest
import torch

from megatron_mgrpo.rollout import RolloutEngine, SamplingParams
from megatron_mgrpo.rollout.hf_engine import HFEngine
from tests.helpers import teacher_forced_logprobs


@pytest.fixture
def prompts(tokenizer):
    # different lengths, so the batch is left-padded
    return [tokenizer.encode(t) for t in ("1+1=", "What is 12*3? ", "x")]


def test_is_a_rollout_engine(make_tiny_qwen3, tokenizer):
    assert isinstance(HFEngine(make_tiny_qwen3(), tokenizer), RolloutEngine)


@pytest.mark.parametrize("max_batch_size", [256, 4])  # one chunk, and several chunks with n not dividing it
def test_logprobs_match_a_teacher_forced_forward(make_tiny_qwen3, tokenizer, prompts, max_batch_size):
    model = make_tiny_qwen3()
    engine = HFEngine(model, tokenizer, max_batch_size=max_batch_size, seed=3)
    sampling = SamplingParams(temperature=1.1, max_new_tokens=12)
    samples = engine.generate(prompts, n=3, sampling=sampling)
    assert [s.prompt_index for s in samples] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert len({tuple(s.response_ids) for s in samples}) > 1
    for s in samples:
        assert s.prompt_ids == prompts[s.prompt_index]
        reference = teacher_forced_logprobs(model, s, 1.1)
        assert torch.allclose(torch.tensor(s.logprobs), reference, atol=1e-5), (s, reference)
        assert s.text == tokenizer.decode(s.response_ids, skip_special_tokens=True)


def test_finish_reasons_and_eos(make_tiny_qwen3, tokenizer, prompts):
    model = make_tiny_qwen3()
    engine = HFEngine(model, tokenizer, seed=0)
    # make <eos> likely so that some samples stop early
    with torch.no_grad():
        model.lm_head.weight[1] = model.lm_head.weight.mean(0) + 0.02
    samples = engine.generate(prompts, n=8, sampling=SamplingParams(max_new_tokens=10))
    reasons = {s.finish_reason for s in samples}
    assert reasons == {"stop", "length"}
    for s in samples:
        if s.finish_reason == "stop":
            assert s.response_ids[-1] == 1 and 1 not in s.response_ids[:-1]
        else:
            assert len(s.response_ids) == 10 and 1 not in s.response_ids


def test_stop_strings(make_tiny_qwen3, tokenizer, prompts):
    engine = HFEngine(make_tiny_qwen3(), tokenizer, seed=0)
    free = engine.generate(prompts, n=4, sampling=SamplingParams(max_new_tokens=30, seed=5))
    # stop at a character that the free-running samples do produce
    stop = next(c for c in "abcdefghijklmnopqrstuvwxyz0123456789" if any(c in s.text for s in free))
    stopped = engine.generate(prompts, n=4, sampling=SamplingParams(max_new_tokens=30, seed=5, stop=(stop,)))
    for a, b in zip(free, stopped):
        if stop in a.text:
            assert b.finish_reason == "stop" and b.text == a.text[:a.text.index(stop) + 1]
        else:
            assert b.response_ids == a.response_ids


def test_seeds_make_sampling_reproducible(make_tiny_qwen3, tokenizer, prompts):
    engine = HFEngine(make_tiny_qwen3(), tokenizer)
    sampling = SamplingParams(max_new_tokens=8, seed=11)
    first = [s.response_ids for s in engine.generate(prompts, 2, sampling)]
    assert first == [s.response_ids for s in engine.generate(prompts, 2, sampling)]
    other = SamplingParams(max_new_tokens=8, seed=12)
    assert first != [s.response_ids for s in engine.generate(prompts, 2, other)]


@pytest.mark.parametrize("sampling", [SamplingParams(top_k=1, max_new_tokens=6),
                                      SamplingParams(top_p=1e-6, max_new_tokens=6)])
def test_top_k_1_and_tiny_top_p_are_greedy(make_tiny_qwen3, tokenizer, prompts, sampling):
    model = make_tiny_qwen3()
    samples = HFEngine(model, tokenizer).generate(prompts, n=2, sampling=sampling)
    for s in samples:
        ids = torch.tensor([s.prompt_ids + s.response_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(s.prompt_ids) - 1:-1]
        assert s.response_ids == logits.argmax(-1).tolist()
        assert s.logprobs == [0.0] * len(s.response_ids)  # the truncated distribution is one token


def test_sampling_follows_the_tempered_distribution(make_tiny_qwen3, tokenizer):
    model = make_tiny_qwen3()
    with torch.no_grad():
        model.lm_head.weight.mul_(8)  # a peaked distribution, so temperature matters
    prompt = tokenizer.encode("7*8=")
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1]
    probs = torch.softmax(logits / 0.7, -1)
    samples = HFEngine(model, tokenizer, seed=0).generate([prompt], n=20000,
                                                         sampling=SamplingParams(temperature=0.7, max_new_tokens=1))
    counts = torch.bincount(torch.tensor([s.response_ids[0] for s in samples]), minlength=len(probs)).float()
    total_variation = 0.5 * (counts / counts.sum() - probs).abs().sum()
    # sampling noise alone gives about 0.02 here; a sampler that ignored the temperature would be off by more
    assert total_variation < 0.04
    assert 0.5 * (torch.softmax(logits, -1) - probs).abs().sum() > 0.1


def test_update_weights_in_place(make_tiny_qwen3, tokenizer, prompts):
    policy, other = make_tiny_qwen3(seed=0), make_tiny_qwen3(seed=1)
    engine = HFEngine(policy, tokenizer)
    storage = policy.lm_head.weight.data_ptr()
    sampling = SamplingParams(max_new_tokens=6, seed=4)
    engine.update_weights(other.state_dict().items(), version=7)
    assert policy.lm_head.weight.data_ptr() == storage
    samples = engine.generate(prompts, n=2, sampling=sampling)
    for s in samples:
        assert s.weights_version == 7
        assert torch.allclose(torch.tensor(s.logprobs), teacher_forced_logprobs(other, s, 1.0), atol=1e-5)
    assert engine.health()["weights_version"] == 7


def test_bad_updates_and_requests_are_clear_errors(make_tiny_qwen3, tokenizer, prompts):
    engine = HFEngine(make_tiny_qwen3(), tokenizer)
    with pytest.raises(KeyError, match="did you mean 'lm_head.weight'"):
        engine.update_weights([("lm_head.weights", torch.zeros(1))], version=1)
    with pytest.raises(ValueError, match="shape"):
        engine.update_weights([("lm_head.weight", torch.zeros(3, 3))], version=1)
    with pytest.raises(ValueError, match="n=0"):
        engine.generate(prompts, n=0, sampling=SamplingParams())
    with pytest.raises(ValueError, match="rollout.temperature"):
        SamplingParams(temperature=0)
    engine.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        engine.health()


def test_truncated_sampling_reports_the_renormalised_logprob(make_tiny_qwen3, tokenizer, prompts):
    model = make_tiny_qwen3()
    samples = HFEngine(model, tokenizer).generate(prompts, n=3, sampling=SamplingParams(
        temperature=0.9, top_k=5, max_new_tokens=5))
    for s in samples:
        ids = torch.tensor([s.prompt_ids + s.response_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(s.prompt_ids) - 1:-1] / 0.9
        top = logits.topk(5, dim=-1)
        assert all(t in row for t, row in zip(s.response_ids, top.indices.tolist()))
        expected = [lp[row.index(t)].item() for t, row, lp in
                    zip(s.response_ids, top.indices.tolist(), torch.log_softmax(top.values, -1))]
        assert torch.allclose(torch.tensor(s.logprobs), torch.tensor(expected), atol=1e-5)


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_moe_update_with_checkpoint_names_reaches_the_fused_experts(kind, tokenizer):
    """Exports name every expert's projections apart (the checkpoint layout); transformers keeps
    them fused in memory. An update must land in the right expert, gate and up halves included."""
    from megatron_mgrpo.models.hf_config import model_spec_from_hf
    from megatron_mgrpo.models.weight_map import checkpoint_layout
    from tests.helpers import tiny

    engine_model, target = tiny(kind).eval(), tiny(kind).eval()
    with torch.no_grad():
        for param in target.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    layout = checkpoint_layout(target.state_dict(), model_spec_from_hf(target.config))
    exported = {k: v.clone() for k, v in layout.items()}
    assert any(".experts.3." in name for name in exported)
    engine = HFEngine(engine_model, tokenizer)
    engine.update_weights(exported.items(), version=1)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.equal(engine.model(input_ids=ids).logits, target(input_ids=ids).logits)
