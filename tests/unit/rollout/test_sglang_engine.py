"""The SGLang engine's HTTP flow against a fake server (tests/unit/rollout/fake_sglang)."""

import json
import os
import signal
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from megatron_mgrpo.parallel.ports import free_port
from megatron_mgrpo.rollout import RolloutEngine, SamplingParams
from megatron_mgrpo.rollout.pool_push import DistributedPoolPush, pool_weight_push
from megatron_mgrpo.rollout.pools import EnginePool
from megatron_mgrpo.rollout.server import ServerError, ServerProcess, ServerSpec
from megatron_mgrpo.rollout.sglang_engine import SGLangEngine
from megatron_mgrpo.rollout.sglang_protocol import generate_payload, init_group_payload, parse_generate_reply
from megatron_mgrpo.rollout.weight_broadcast import WeightBroadcaster

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


@pytest.mark.slow
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


@pytest.mark.slow
def test_push_replaces_the_previous_snapshot(engine, tmp_path):
    engine.update_weights(weights(1.0), version=1)
    first = Path(requests(tmp_path, "/update_weights_from_disk")[0]["model_path"])
    engine.update_weights(weights(2.0), version=2)
    assert not first.exists()
    engine.shutdown()
    assert not Path(requests(tmp_path, "/update_weights_from_disk")[1]["model_path"]).exists()


@pytest.mark.slow
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


@pytest.mark.slow
def test_distributed_mode_sends_weights_through_a_real_weight_group(tmp_path):
    """The fake server joins a gloo group with the engine's broadcaster and receives each bucket by
    broadcast: what SGLang does over NCCL. The group is formed once and reused; a restarted server
    gets the last weights from the snapshot and joins a new group at the next push."""
    (tmp_path / "model").mkdir()
    broadcaster = WeightBroadcaster("127.0.0.1", 0, 2, group_name="mgrpo-policy-0", backend="gloo", device="cpu",
                                    timeout_s=60)
    engine = make_engine(tmp_path, weight_sync="distributed", broadcaster=broadcaster, bucket_bytes=16)
    one = SamplingParams(max_new_tokens=1)
    try:
        engine.update_weights(weights(0.5), version=1)  # 4 * 0.5 + 6 * 0.5 = 5
        (join,) = requests(tmp_path, "/init_weights_update_group")
        assert join == init_group_payload(broadcaster) and join["master_port"] > 0
        pushes = requests(tmp_path, "/update_weights_from_distributed")
        assert [p["names"] for p in pushes] == [["model.norm.weight"], ["lm_head.weight"]]  # 16 + 24 bytes
        assert [p["flush_cache"] for p in pushes] == [False, True] and pushes[-1]["weight_version"] == "1"
        sample = engine.generate([[1]], n=1, sampling=one)[0]
        assert sample.logprobs == [-5.0] and sample.weights_version == 1

        engine.update_weights(weights(1.0), version=2)  # the same group: no second join
        assert len(requests(tmp_path, "/init_weights_update_group")) == 1
        assert len(requests(tmp_path, "/update_weights_from_distributed")) == 4
        assert engine.generate([[1]], n=1, sampling=one)[0].logprobs == [-10.0]
        assert not requests(tmp_path, "/update_weights_from_disk")

        os.killpg(engine.server._proc.pid, signal.SIGKILL)  # restarted, given weights 2 from the snapshot
        sample = engine.generate([[1]], n=1, sampling=one)[0]
        assert sample.logprobs == [-10.0] and sample.weights_version == 2
        assert [r["weight_version"] for r in requests(tmp_path, "/update_weights_from_disk")] == ["2"]
        engine.update_weights(weights(2.0), version=3)  # the new server joins a new group (fresh port and name)
        joins = requests(tmp_path, "/init_weights_update_group")
        assert len(joins) == 2 and joins[1]["master_port"] != joins[0]["master_port"]
        assert joins[1]["group_name"] == "mgrpo-policy-0.1"
        assert engine.generate([[1]], n=1, sampling=one)[0].logprobs == [-20.0]
    finally:
        engine.shutdown()
    assert broadcaster.group is None


@pytest.mark.slow
def test_a_refused_group_join_is_an_error_at_once(tmp_path):
    """A server that refuses to join (here: the fake, asked for two TP ranks) fails the push with
    its own reason, without waiting out the rendezvous timeout."""
    (tmp_path / "model").mkdir()
    broadcaster = WeightBroadcaster("127.0.0.1", 0, 3, group_name="mgrpo-policy-0", backend="gloo", device="cpu",
                                    timeout_s=120)
    engine = make_engine(tmp_path, weight_sync="distributed", broadcaster=broadcaster, tp_size=2)
    try:
        with pytest.raises(ServerError, match="(?s)refused joining weight group 'mgrpo-policy-0'.*--tp-size 1"):
            engine.update_weights(weights(1.0), version=1)
        assert engine.weights_version == 0 and broadcaster.group_name == "mgrpo-policy-0.1"  # closed
    finally:
        engine.shutdown()


@pytest.mark.slow
def test_a_pool_shares_one_weight_group_and_broadcasts_each_bucket_once(tmp_path, monkeypatch):
    """Three fake servers hold ranks 1, 2, 3 of one gloo group: each push names every bucket to
    each server while rank 0 broadcasts each tensor once for all of them. The group is formed at
    the first push and reused; when a server is restarted (restored from its snapshot) the group
    is broken, and the next push forms a new one, under a new name, with all three; so too after
    a push that failed because a server was gone."""
    original, broadcasts = torch.distributed.broadcast, []

    def counted(tensor, **kwargs):  # rank 0's side: what it sent, in elements per tensor
        broadcasts.append(tensor.numel())
        return original(tensor, **kwargs)

    monkeypatch.setattr(torch.distributed, "broadcast", counted)
    broadcaster = WeightBroadcaster("127.0.0.1", 0, 4, group_name="mgrpo-policy", backend="gloo", device="cpu",
                                    timeout_s=60)
    dirs = [tmp_path / f"server{i}" for i in range(3)]
    engines = []
    try:
        for i, directory in enumerate(dirs):
            (directory / "model").mkdir(parents=True)
            engines.append(make_engine(directory, weight_sync="distributed", broadcaster=broadcaster,
                                       rank_offset=1 + i, bucket_bytes=16))
        pool = EnginePool("policy", engines, push=pool_weight_push(engines))

        def generated():
            samples = [s for group in pool.generate([[1], [2], [3]], 1, SamplingParams(max_new_tokens=1))
                       for s in group]
            return [(s.logprobs, s.weights_version) for s in samples]

        pool.update_weights(lambda: iter(weights(0.5)), version=1)  # 4 * 0.5 + 6 * 0.5 = 5
        joins = [requests(d, "/init_weights_update_group") for d in dirs]
        assert [[j["rank_offset"] for j in js] for js in joins] == [[1], [2], [3]]
        assert {(j["world_size"], j["master_port"], j["group_name"]) for js in joins for j in js} == {
            (4, broadcaster.master_port, "mgrpo-policy")}
        assert [len(requests(d, "/update_weights_from_distributed")) for d in dirs] == [2, 2, 2]  # 2 buckets
        assert broadcasts == [4, 6]  # each tensor once, for all three servers
        assert generated() == [([-5.0], 1)] * 3

        pool.update_weights(lambda: iter(weights(1.0)), version=2)  # the same group
        assert [len(requests(d, "/init_weights_update_group")) for d in dirs] == [1, 1, 1]
        assert [len(requests(d, "/update_weights_from_distributed")) for d in dirs] == [4, 4, 4]
        assert broadcasts == [4, 6, 4, 6]
        assert generated() == [([-10.0], 2)] * 3

        os.killpg(engines[1].server._proc.pid, signal.SIGKILL)  # restarted with weights 2 from its snapshot
        assert generated() == [([-10.0], 2)] * 3 and broadcaster.group is None
        pool.update_weights(lambda: iter(weights(2.0)), version=3)  # all three join a new group
        joins = [requests(d, "/init_weights_update_group") for d in dirs]
        assert [[j["group_name"] for j in js] for js in joins] == [["mgrpo-policy", "mgrpo-policy.1"]] * 3
        assert generated() == [([-20.0], 3)] * 3

        url = engines[2].server.spec.url
        os.killpg(engines[2].server._proc.pid, signal.SIGKILL)  # gone at the next push: it fails, the group closes
        with pytest.raises(ServerError, match="weights version 4 did not reach the servers of .*'mgrpo-policy.1'"):
            pool.update_weights(lambda: iter(weights(3.0)), version=4)
        assert broadcaster.group is None and [e.weights_version for e in engines] == [3, 3, 3]
        assert generated()[2] == ([-20.0], 3)  # restarted from the snapshot of the last complete push
        pool.update_weights(lambda: iter(weights(3.0)), version=5)  # all three in a new group
        assert engines[2].server.spec.url == url and broadcaster.group_name == "mgrpo-policy.2"
        assert generated() == [([-30.0], 5)] * 3
    finally:
        for engine in engines:
            engine.shutdown()
    assert broadcaster.group is None


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


@pytest.mark.slow
def test_attached_server_is_used_but_never_started_or_stopped(tmp_path):
    """A server a launcher started (as `mgrpo launch` does on the rollout nodes): the engine talks
    to it at its URL, writes weights where the server can read them, leaves it running at
    shutdown; a server that goes down mid-run is waited for, and once its supervisor brings it
    back it is given the last weights again before the request is retried."""
    (tmp_path / "model").mkdir()
    port = free_port()
    env = {"PYTHONPATH": os.pathsep.join([str(FAKE), os.environ.get("PYTHONPATH", "")]),
           "FAKE_SGLANG_DIR": str(tmp_path)}
    launched = ServerProcess(ServerSpec(
        [sys.executable, "-m", "sglang.launch_server", "--model-path", str(tmp_path / "model"), "--host", "127.0.0.1",
         "--port", str(port), "--api-key", "k", "--dtype", "auto", "--tp-size", "1"],
        port=port, log_file=tmp_path / "launcher.log", api_key="k", env=env, startup_timeout_s=60))
    with launched:
        engine = SGLangEngine(tmp_path / "model", url=f"http://127.0.0.1:{port}", api_key="k",
                              weights_dir=tmp_path / "shared", startup_timeout_s=3, max_retries=1)
        assert engine.health()["url"] == f"http://127.0.0.1:{port}"
        engine.update_weights(weights(0.5), version=2)
        (load,) = requests(tmp_path, "/update_weights_from_disk")
        assert Path(load["model_path"]).parent == tmp_path / "shared"
        assert engine.generate([[1]], n=1, sampling=SamplingParams(max_new_tokens=1))[0].logprobs == [-5.0]

        launched.stop()  # gone, and nobody brings it back: a clear error once the wait is over
        with pytest.raises(ServerError, match=f"(?s)127.0.0.1:{port}/health after 3 s.*started elsewhere"):
            engine.generate([[1]], n=1, sampling=SamplingParams(max_new_tokens=1))
        restart = threading.Timer(1.0, launched.start)  # its supervisor brings it back while we wait
        restart.start()
        sample = engine.generate([[1]], n=1, sampling=SamplingParams(max_new_tokens=1))[0]
        restart.join()
        assert sample.logprobs == [-5.0] and sample.weights_version == 2
        assert [r["weight_version"] for r in requests(tmp_path, "/update_weights_from_disk")] == ["2", "2"]

        engine.shutdown()
        assert launched.is_alive() and launched.healthy()
    with pytest.raises(ValueError, match="must look like http://HOST:PORT"):
        SGLangEngine(tmp_path / "model", url="127.0.0.1:30000")


def test_bad_configurations_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="weight_sync='rdma'"):
        SGLangEngine(tmp_path, weight_sync="rdma")
    with pytest.raises(ValueError, match="needs a WeightBroadcaster"):
        SGLangEngine(tmp_path, weight_sync="distributed")
    group = WeightBroadcaster("127.0.0.1", 0, 3, group_name="mgrpo-policy", backend="gloo", device="cpu")
    with pytest.raises(ValueError, match=r"rank_offset=2 with tp_size=2 does not fit in ranks 1\.\.2"):
        SGLangEngine(tmp_path, weight_sync="distributed", broadcaster=group, rank_offset=2, tp_size=2)
    alone = SimpleNamespace(broadcaster=group, rank_offset=1, tp_size=1, server=SimpleNamespace(
        spec=SimpleNamespace(url="http://a:1")))  # one server of a group of two: not pushed to alone
    with pytest.raises(ValueError, match=r"(?s)hold ranks \[1\].*needs exactly 1\.\.2: push through the EnginePool"):
        DistributedPoolPush([alone])
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))
    with pytest.raises(ValueError, match="no num_experts_per_tok"):
        SGLangEngine(tmp_path, routed_experts=True)


@pytest.mark.slow
def test_requests_failing_together_restart_the_server_once(engine, tmp_path):
    engine.update_weights(weights(0.5), version=4)
    os.killpg(engine.server._proc.pid, signal.SIGKILL)
    samples = engine.generate([[1], [2], [3], [4], [5], [6]], n=1, sampling=SamplingParams(max_new_tokens=1))
    assert [s.logprobs for s in samples] == [[-5.0]] * 6  # every retry served by the restarted server, weights 4
    assert engine.server.log_excerpt().count("==== starting") == 2  # the first start and one restart
    assert [r["weight_version"] for r in requests(tmp_path, "/update_weights_from_disk")] == ["4", "4"]
