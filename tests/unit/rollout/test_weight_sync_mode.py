"""Which weight sync the trainer picks for its SGLang servers, and the group it builds for them."""

import json
import os
import socket
import sys
import threading
from pathlib import Path

import pytest
import torch

from megatron_mgrpo.config import ConfigError, load_config
from megatron_mgrpo.parallel.ports import free_port
from megatron_mgrpo.rollout import SamplingParams
from megatron_mgrpo.rollout.build import build_pools
from megatron_mgrpo.rollout.server import ServerError, ServerProcess, ServerSpec
from megatron_mgrpo.rollout.weight_broadcast import rank0_address, trainer_broadcaster
from megatron_mgrpo.trainer import Trainer

FAKE = Path(__file__).parent / "fake_sglang"
EXAMPLES = Path(__file__).parents[3] / "examples" / "configs"


def mode(*overrides, path=None):
    return load_config(path, list(overrides)).sglang_weight_sync()


def test_auto_is_distributed_only_for_disaggregated_sglang():
    assert mode("rollout.engine=sglang", "launch.placement=disaggregated") == "distributed"
    assert mode("rollout.engine=sglang", "launch.placement=colocated") == "disk"
    assert mode("rollout.engine=vllm", "launch.placement=disaggregated") == "disk"
    assert mode() == "disk"  # the in-process engine
    assert mode("rollout.engine=sglang", "launch.placement=disaggregated", "rollout.weight_sync=disk") == "disk"
    assert mode("rollout.engine=sglang", "launch.placement=disaggregated",
                "rollout.weight_sync=distributed") == "distributed"


@pytest.mark.parametrize("recipe", ["mgrpo_qwen3_8b_math.yaml", "mgrpo_qwen3_30b_a3b_math.yaml"])
def test_the_disaggregated_recipes_sync_through_the_weight_group(recipe):
    assert mode(path=EXAMPLES / recipe) == "distributed"


@pytest.mark.parametrize("overrides, message", [
    (["rollout.engine=vllm", "launch.placement=disaggregated"], "rollout.engine=vllm does not have"),
    (["rollout.engine=hf"], "rollout.engine=hf does not have"),
    (["rollout.engine=sglang", "launch.placement=colocated"], "cannot hold two ranks on one GPU"),
])
def test_distributed_where_it_cannot_work_names_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=f"(?s)rollout.weight_sync=distributed.*{message}.*rollout.weight_sync=auto"):
        load_config(overrides=[*overrides, "rollout.weight_sync=distributed"])


def test_servers_connect_to_the_jobs_rendezvous_host():
    slurm = {"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_JOB_NODELIST": "gpu[003-006]"}
    assert rank0_address(remote=True, env=slurm) == "gpu003"  # rank 0 runs on the first training node
    assert rank0_address(remote=True, env={**slurm, "MASTER_ADDR": "gpu004-ib"}) == "gpu004-ib"
    torchrun = {"RANK": "0", "WORLD_SIZE": "8", "MASTER_ADDR": "trainer-0"}
    assert rank0_address(remote=True, env=torchrun) == "trainer-0"
    assert rank0_address(remote=False, env={}) == "127.0.0.1"  # a lone process, its servers on this host
    assert rank0_address(remote=True, env={}) == socket.getfqdn()  # ... and on others: what this host calls itself


def test_trainer_broadcaster_on_cpu():
    broadcaster = trainer_broadcaster("mgrpo-momentum", 8, remote=False)  # say, two servers of 4 GPUs
    assert (broadcaster.world_size, broadcaster.group_name, broadcaster.master_port) == (9, "mgrpo-momentum", 0)
    assert (broadcaster.backend, broadcaster.device) == ("gloo", torch.device("cpu"))


def launched_server(tmp_path, name):
    """A (fake) SGLang server as a launcher starts it: logging to tmp_path/name, no API key."""
    (tmp_path / name).mkdir()
    port = free_port()
    return ServerProcess(ServerSpec(
        [sys.executable, "-m", "sglang.launch_server", "--model-path", str(tmp_path / "model"), "--host", "127.0.0.1",
         "--port", str(port), "--dtype", "auto", "--tp-size", "1"],
        port=port, log_file=tmp_path / name / "launcher.log", startup_timeout_s=60,
        env={"PYTHONPATH": os.pathsep.join([str(FAKE), os.environ.get("PYTHONPATH", "")]),
             "FAKE_SGLANG_DIR": str(tmp_path / name)}))


@pytest.mark.slow
def test_trainer_attaches_disaggregated_sglang_servers_through_one_weight_group(tmp_path, monkeypatch):
    """The trainer's wiring end to end on CPU: the two (fake) SGLang servers named in
    MGRPO_POLICY_URLS share one gloo group, ranks 1 and 2, and receive weights through it; when
    one comes back after being unreachable it is left alone if it kept its weights, and if it
    was restarted the engine, with no copy to restore it from, says so, and the next push forms
    a new group with both; the group is left when the trainer closes."""
    (tmp_path / "model").mkdir()
    servers = [launched_server(tmp_path, "a"), launched_server(tmp_path, "b")]
    monkeypatch.setenv("MGRPO_POLICY_URLS", ",".join(server.spec.url for server in servers))
    trainer = Trainer.__new__(Trainer)  # only what `close` reads: no model, no Megatron
    cfg = load_config(overrides=["rollout.engine=sglang", "launch.placement=disaggregated",
                                 "reward.label_source=srt"])  # srt: the policy pool alone
    trainer.grader, trainer.producers = None, {}
    one = SamplingParams(max_new_tokens=1)
    with servers[0], servers[1]:
        trainer.pools = build_pools(cfg, tmp_path / "run", tmp_path / "model", tokenizer=None, hf_model=None,
                                    dtype="float32")
        pool = trainer.pools.policy
        engines = pool.engines
        broadcaster = engines[0].broadcaster
        assert [(e.weight_sync, e.broadcaster, e.rank_offset) for e in engines] == [
            ("distributed", broadcaster, 1), ("distributed", broadcaster, 2)]
        assert (broadcaster.group_name, broadcaster.world_size) == ("mgrpo-policy", 3)
        pool.update_weights(lambda: iter([("lm_head.weight", torch.full((2, 3), 0.5))]), version=1)
        assert [s[0].logprobs for s in pool.generate([[1], [2]], 1, one)] == [[-3.0], [-3.0]]
        for name in "ab":
            log = (tmp_path / name / "requests.jsonl").read_text().splitlines()
            routes = [json.loads(line)["route"] for line in log]
            assert "/init_weights_update_group" in routes and "/update_weights_from_disk" not in routes
        assert engines[0]._snapshot_dir is None  # no file per push, not even in this host's memory
        group = broadcaster.group
        engines[0]._repush_weights()  # what recovery does once it answers again: still version 1, nothing to do
        assert broadcaster.group is group

        servers[0].stop()
        restart = threading.Timer(1.0, servers[0].start)  # as if a supervisor brought it back
        restart.start()
        with pytest.raises(ServerError, match="(?s)back with weights version 'default' instead of 1.*weight_sync=disk"):
            engines[0].generate([[1]], n=1, sampling=one)
        restart.join()
        assert broadcaster.group is None  # broken for both servers
        pool.update_weights(lambda: iter([("lm_head.weight", torch.full((2, 3), 1.0))]), version=2)  # a new group
        assert [s[0].logprobs for s in pool.generate([[1], [2]], 1, one)] == [[-6.0], [-6.0]]
        assert [e.weights_version for e in engines] == [2, 2] and broadcaster.group_name == "mgrpo-policy.1"
        trainer.close()
        assert broadcaster.group is None and all(server.healthy() for server in servers)
