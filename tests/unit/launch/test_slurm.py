import pytest

from megatron_mgrpo.launch import LaunchError
from megatron_mgrpo.launch.planner import check_layout
from megatron_mgrpo.launch.render import render_steps
from megatron_mgrpo.launch.slurm import assign_nodes, slurm_job_from_env

JOB_ENV = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu-[001-003,010]", "SLURM_JOB_NUM_NODES": "4",
           "SLURM_GPUS_PER_NODE": "h100:8", "SLURM_RESTART_COUNT": "2"}


def test_job_from_slurm_variables():
    job = slurm_job_from_env(JOB_ENV)
    assert job.hosts == ("gpu-001", "gpu-002", "gpu-003", "gpu-010")
    assert (job.job_id, job.gpus_per_node, job.restart_count) == ("4242", 8, 2)
    assert slurm_job_from_env({}) is None


def test_node_count_mismatch_is_reported():
    with pytest.raises(LaunchError, match="expands to 4 hosts but SLURM_JOB_NUM_NODES=3"):
        slurm_job_from_env({**JOB_ENV, "SLURM_JOB_NUM_NODES": "3"})


def test_disaggregated_roles_and_commands(load_recipe):
    cfg, shape = load_recipe("mgrpo_qwen3_8b_math.yaml")
    layout = check_layout(cfg, shape)
    roles = assign_nodes(slurm_job_from_env(JOB_ENV).hosts, layout)
    assert roles.train == ("gpu-001", "gpu-002") and roles.rollout == ("gpu-003", "gpu-010")
    steps = render_steps(cfg, layout, roles, config_path="c.yaml", overrides=["train.steps=3"], launcher="srun",
                         log_dir="logs")
    servers, [train] = steps[:-1], steps[-1:]
    assert len(servers) == 16
    policy, momentum = servers[:12], servers[12:]
    assert {s.engine.host for s in policy} == {"gpu-003", "gpu-010"} and len(policy) == 12
    assert [(s.engine.host, s.engine.port) for s in momentum] == [("gpu-010", 30004 + i) for i in range(4)]
    assert "--nodelist=gpu-010" in momentum[0].argv and "CUDA_VISIBLE_DEVICES=4" in momentum[0].argv
    argv = train.argv
    assert "--nodelist=gpu-001,gpu-002" in argv and "--ntasks-per-node=8" in argv
    assert "MASTER_ADDR=gpu-001" in argv
    momentum_urls = next(a for a in argv if a.startswith("MGRPO_MOMENTUM_URLS="))
    assert momentum_urls == "MGRPO_MOMENTUM_URLS=" + ",".join(f"http://gpu-010:{30004 + i}" for i in range(4))
    assert argv[-5:] == ("megatron_mgrpo.cli", "train", "--config", "c.yaml", "train.steps=3")


def test_moe_engines_span_their_gpus(load_recipe):
    cfg, shape = load_recipe("mgrpo_qwen3_30b_a3b_math.yaml")
    layout = check_layout(cfg, shape)
    hosts = tuple(f"n{i}" for i in range(8))
    steps = render_steps(cfg, layout, assign_nodes(hosts, layout), config_path="c.yaml", overrides=[],
                         launcher="srun", log_dir="logs")
    first = steps[0].argv
    assert "CUDA_VISIBLE_DEVICES=0,1,2,3" in first and first[first.index("--tp-size") + 1] == "4"
    assert steps[0].engine.host == "n4"


def test_allocation_must_match_the_plan(load_recipe):
    cfg, shape = load_recipe("mgrpo_qwen3_8b_math.yaml")
    with pytest.raises(LaunchError, match="the allocation has 2 node"):
        assign_nodes(("a", "b"), check_layout(cfg, shape))


def test_torchrun_refuses_several_nodes(load_recipe):
    cfg, shape = load_recipe("mgrpo_qwen3_8b_math.yaml")
    layout = check_layout(cfg, shape)
    with pytest.raises(LaunchError, match="use --launcher srun"):
        render_steps(cfg, layout, assign_nodes(("a", "b", "c", "d"), layout), config_path="c.yaml", overrides=[],
                     launcher="torchrun", log_dir="logs")


@pytest.mark.parametrize("nodelist, hosts", [
    ("gpu-[001-004,010]", ["gpu-001", "gpu-002", "gpu-003", "gpu-004", "gpu-010"]),
    ("a[8-11],b1", ["a8", "a9", "a10", "a11", "b1"]),
    ("r[1-2]n[01-02]", ["r1n01", "r1n02", "r2n01", "r2n02"]),
])
def test_nodelist_expansion(nodelist, hosts):
    from megatron_mgrpo.parallel.dist import slurm_hostnames

    assert slurm_hostnames(nodelist) == hosts
