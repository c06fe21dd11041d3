"""The exact srun command lines of a 1-node and a 2-node launch, on the host and inside a container.

Golden strings on purpose: these lines are what runs on the cluster, so any change to them should
show up here and be looked at. The container flags (pyxis) go between srun's own options and the
step's `env`, on every step, servers and trainer alike.
"""

import pytest

from megatron_mgrpo.launch import LaunchError
from megatron_mgrpo.launch.planner import check_layout
from megatron_mgrpo.launch.render import render_steps
from megatron_mgrpo.launch.slurm import assign_nodes

#: Qwen3-8B-Base's recipe plans 4 nodes (2 train + 2 rollout); on 2 nodes one of each, with the
#: rollout engines cut to fill the one rollout node's 8 GPUs exactly (6 policy + 2 momentum).
TWO_NODES = ("launch.nodes=2", "launch.rollout_nodes=1", "launch.policy_engines=6", "launch.momentum_engines=2")
CONTAINER = ("launch.container_image=nvcr.io#acme/mgrpo:0.1.0", "launch.container_mounts=/lustre/me:/lustre/me",
             "launch.container_workdir=/lustre/me")
CONTAINER_FLAGS = ("'--container-image=nvcr.io#acme/mgrpo:0.1.0' --container-mounts=/lustre/me:/lustre/me "
                   "--container-workdir=/lustre/me")

# The last server of each plan: a momentum engine on the last GPU of the (rollout) node.
ONE_NODE_SERVER = (
    "srun --overlap --job-name=momentum-engine-1 --nodes=1 --nodelist=n0 --ntasks-per-node=1 --gpu-bind=none "
    "--cpu-bind=none --kill-on-bad-exit=1 --output=logs/momentum-engine-1-%j.log "
    "env CUDA_VISIBLE_DEVICES=7 python3 -m sglang.launch_server --model-path Qwen/Qwen3-4B-Base --host 0.0.0.0 "
    "--port 30007 --tp-size 1 --mem-fraction-static 0.35 --context-length 4096 --dtype bfloat16")
ONE_NODE_TRAIN = (
    "srun --overlap --job-name=train --nodes=1 --nodelist=n0 --ntasks-per-node=8 --gpu-bind=none --cpu-bind=none "
    "--kill-on-bad-exit=1 --output=logs/train-%j.log "
    "env MGRPO_POLICY_URLS=http://n0:30000,http://n0:30001,http://n0:30002,http://n0:30003,http://n0:30004,"
    "http://n0:30005 MGRPO_MOMENTUM_URLS=http://n0:30006,http://n0:30007 MASTER_ADDR=n0 MASTER_PORT=29500 "
    "python3 -m megatron_mgrpo.cli train --config c.yaml train.steps=3")
TWO_NODE_SERVER = (
    "srun --overlap --job-name=momentum-engine-1 --nodes=1 --nodelist=n1 --ntasks-per-node=1 --gpu-bind=none "
    "--cpu-bind=none --kill-on-bad-exit=1 --output=logs/momentum-engine-1-%j.log "
    "env CUDA_VISIBLE_DEVICES=7 python3 -m sglang.launch_server --model-path Qwen/Qwen3-8B-Base --host 0.0.0.0 "
    "--port 30007 --tp-size 1 --mem-fraction-static 0.85 --context-length 4096 --dtype bfloat16")
TWO_NODE_TRAIN = (
    "srun --overlap --job-name=train --nodes=1 --nodelist=n0 --ntasks-per-node=8 --gpu-bind=none --cpu-bind=none "
    "--kill-on-bad-exit=1 --output=logs/train-%j.log "
    "env MGRPO_POLICY_URLS=http://n1:30000,http://n1:30001,http://n1:30002,http://n1:30003,http://n1:30004,"
    "http://n1:30005 MGRPO_MOMENTUM_URLS=http://n1:30006,http://n1:30007 MASTER_ADDR=n0 MASTER_PORT=29500 "
    "python3 -m megatron_mgrpo.cli train --config c.yaml train.steps=3")

CASES = {
    "1 node": ("mgrpo_qwen3_4b_math.yaml", ("n0",), (), ONE_NODE_SERVER, ONE_NODE_TRAIN),
    "2 nodes": ("mgrpo_qwen3_8b_math.yaml", ("n0", "n1"), TWO_NODES, TWO_NODE_SERVER, TWO_NODE_TRAIN),
}


def _steps(load_recipe, recipe, hosts, *overrides, launcher="srun"):
    cfg, shape = load_recipe(recipe, *overrides)
    layout = check_layout(cfg, shape)
    return render_steps(cfg, layout, assign_nodes(hosts, layout), config_path="c.yaml", overrides=["train.steps=3"],
                        launcher=launcher, log_dir="logs")


def _in_container(command: str) -> str:
    return command.replace(" env ", f" {CONTAINER_FLAGS} env ", 1)


@pytest.mark.parametrize("case", CASES)
def test_commands_on_the_host(load_recipe, case):
    recipe, hosts, overrides, server, train = CASES[case]
    steps = _steps(load_recipe, recipe, hosts, *overrides)
    assert len(steps) == 9  # 6 policy + 2 momentum servers, then the trainer
    assert steps[-2].shell() == server and steps[-1].shell() == train
    assert not any("--container" in step.shell() for step in steps)


@pytest.mark.parametrize("case", CASES)
def test_commands_in_a_container(load_recipe, case):
    recipe, hosts, overrides, server, train = CASES[case]
    steps = _steps(load_recipe, recipe, hosts, *overrides, *CONTAINER)
    assert len(steps) == 9
    assert steps[-2].shell() == _in_container(server) and steps[-1].shell() == _in_container(train)
    assert all(f"--output=logs/{step.name}-%j.log {CONTAINER_FLAGS} env " in step.shell() for step in steps)


def test_image_alone_keeps_the_image_workdir_and_mounts_nothing(load_recipe):
    steps = _steps(load_recipe, "mgrpo_qwen3_4b_math.yaml", ("n0",), CONTAINER[0])
    assert steps[-1].shell() == _in_container(ONE_NODE_TRAIN).replace(CONTAINER_FLAGS,
                                                                      "'--container-image=nvcr.io#acme/mgrpo:0.1.0'")


def test_container_needs_srun(load_recipe):
    with pytest.raises(LaunchError, match="use --launcher srun"):
        _steps(load_recipe, "mgrpo_qwen3_4b_math.yaml", ("n0",), *CONTAINER, launcher="torchrun")


def test_mounts_without_an_image_are_refused_not_dropped(load_recipe):
    with pytest.raises(LaunchError, match="launch.container_mounts is set but launch.container_image is empty"):
        _steps(load_recipe, "mgrpo_qwen3_4b_math.yaml", ("n0",), CONTAINER[1])
