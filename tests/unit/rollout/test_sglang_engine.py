"""The SGLang engine's HTTP flow against a fake server (tests/unit/rollout/fake_sglang)."""

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

from megatron_mgrpo.rollout import RolloutEngine, SamplingParams
from megatron_mgrpo.rollout.sglang_engine import SGLangEngine, generate_payload, parse_generate_reply

FAKE = Path(__file__).parent / "fake_sglang"


def make_engine(tmp_path, **kwargs):
    env = {"PYTHONPATH": os.pathsep.join([str(FAKE), os.environ.get("PYTHONPATH", "")]),
           "FAKE_SGLANG_DIR": str(tmp_path)}
    return SGLangEngine(tmp_path / "model", python=sys.executable, log_dir=tmp_path / "logs", env=env,
                        startup_timeout_s=60, request_timeout_s=30, max_retries=2, **kwargs)


def requests(tmp_path, route):
    lines = (tmp_path / "requests.jsonl").read_text().splitlines()
    return [entry["body"] for entry in map(json.loads, lines) if entry["route"] == route]


def weights(value):
    return [("model.norm.weight", torch.full((4,), value)), ("lm_head.weight", torch.full((2, 3), value))]


@pytest.fixture
def engine(tmp_path):
    (tmp_path / "model").mkdir()
    engine = make_engine(tmp_path)
    yield engine
    engine.shutdown()


def test_generate_push_retry_and_restart_with_repush(engine, tmp_path):
    assert isinstance(engine, RolloutEngine) and engine.health()["engine"] == "sglang"
    prompts = [[5, 6, 7], [9]]
    samples = engine.generate(prompts, n=3, sampling=SamplingParams(max_new_tokens=4))
    assert [s.prompt_index for s in samples] == [0, 0, 0, 1, 1, 1]
    assert samples[0].response_ids == [7] * 4 and samples[3].response_ids == [9] * 4
    assert all(s.logprobs == [0.0] * 4 and s.finish_reason == "length" and s.weights_version == 0 for s in samples)

    engine.update_weights(weights(0.5), version=3)  # 4 * 0.5 + 6 * 0.5 = 5
    (load,) = requests(tmp_path, "/update_weights_from_disk")
    assert load["weight_version"] == "3" and Path(load["model_path"], "model.safetensors").exists()
    sample = engine.generate([[1, 2]], n=1, sampling=SamplingParams(max_new_tokens=2))[0]
    assert sample.logprobs == [-5.0, -5.0] and sample.weights_version == 3

    (tmp_path / "fail_next").touch()  # a 5xx is retried on the same (healthy) server
    assert engine.generate([[1]], n=1, sampling=SamplingParams(max_new_tokens=1))[0].logprobs == [-5.0]
    assert len(requests(tmp_path, "/update_weights_from_disk")) == 1

    os.killpg(engine.server._proc.pid, signal.SIGKILL)  # a dead server is restarted and re-given weights 3
    sample = engine.generate([[1]], n=1, sampling=SamplingParams(max_new_tokens=1))[0]
    assert sample.logprobs == [-5.0] and sample.weights_version == 3
    assert [r["weight_version"] for r in requests(tmp_path, "/update_weights_from_disk")] == ["3", "3"]


def test_push_replaces_the_previous_snapshot(engine, tmp_path):
    engine.update_weights(weights(1.0), version=1)
    first = Path(requests(tmp_path, "/update_weights_from_disk")[0]["model_path"])
    engine.update_weights(weights(2.0), version=2)
    assert not first.exists()
    engine.shutdown()
    assert not Path(requests(tmp_path, "/update_weights_from_disk")[1]["model_path"]).exists()


def test_tensor_mode_resumes_memory_around_bucketed_pushes(tmp_path):
    (tmp_path / "model").mkdir()
    engine = make_engine(tmp_path, weight_sync="tensor", tp_size=2, bucket_bytes=16)
    try:
        engine.release_memory()
        engine.update_weights(weights(1.0), version=7)
        pushes = requests(tmp_path, "/update_weights_from_tensor")
        assert len(pushes) == 2  # 16 + 24 bytes do not share a 16-byte bucket
        assert [len(p["serialized_named_tensors"]) for p in pushes] == [2, 2]
        assert [p["flush_cache"] for p in pushes] == [False, True] and pushes[-1]["weight_version"] == "7"
        resumes = [r["tags"] for r in requests(tmp_path, "/resume_memory_occupation")]
        assert resumes == [["weights"], ["kv_cache"]]
        assert engine.health()["memory_released"] == []
        engine.update_weights(weights(1.0), version=8)  # nothing released: no resume requests
        assert len(requests(tmp_path, "/resume_memory_occupation")) == 2
    finally:
        engine.shutdown()


def test_truncated_sampling_reads_the_renormalised_logprobs():
    sampling = SamplingParams(top_k=5, max_new_tokens=2)
    body = generate_payload([1, 2], 2, sampling)
    assert body["return_sampling_mask"] and body["sampling_logprobs_mode"] == "selected"
    meta = {"finish_reason": {"type": "stop"}, "output_token_logprobs": [[-9.0, 3, None]] * 2,
            "output_token_sampling_logprobs": [-0.5, -0.25]}
    (sample,) = parse_generate_reply({"text": "ab", "output_ids": [3, 4], "meta_info": meta}, 0, [1, 2], sampling, 0)
    assert sample.logprobs == [-0.5, -0.25] and sample.finish_reason == "stop"
    assert "return_sampling_mask" not in generate_payload([1], 1, SamplingParams())


def test_routed_experts_become_per_layer_tensors(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"num_hidden_layers": 2, "num_experts_per_tok": 2}))
    engine = make_engine(tmp_path, routed_experts=True)
    try:
        (sample,) = engine.generate([[4, 5, 6]], n=1, sampling=SamplingParams(max_new_tokens=2))
        assert "--enable-return-routed-experts" in engine.server.spec.command
        layers = sample.routed_experts
        assert len(layers) == 2 and all(layer.shape == (4, 2) for layer in layers)  # 3 + 2 - 1 positions
        assert torch.equal(layers[1][:, 0], torch.arange(4, dtype=torch.int32))
    finally:
        engine.shutdown()


def test_bad_configurations_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="weight_sync='rdma'"):
        SGLangEngine(tmp_path, weight_sync="rdma")
    with pytest.raises(ValueError, match="needs a WeightBroadcaster"):
        SGLangEngine(tmp_path, weight_sync="distributed")
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))
    with pytest.raises(ValueError, match="no num_experts_per_tok"):
        SGLangEngine(tmp_path, routed_experts=True)
