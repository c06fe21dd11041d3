import pytest

from megatron_mgrpo.cli import main
from tests.unit.launch.conftest import model_config_path, recipe_path

RECIPE = "mgrpo_qwen3_4b_math.yaml"


def test_dry_run_prints_plan_and_commands(capsys, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert main(["launch", "--config", recipe_path(RECIPE), "--model-config", model_config_path(RECIPE),
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4.02 B parameters, dense" in out and "fits" in out
    assert "torchrun --nnodes=1 --nproc-per-node=8" in out


def test_bad_layout_exits_2_naming_the_constraint(capsys, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    code = main(["launch", "--config", recipe_path(RECIPE), "--model-config", model_config_path(RECIPE),
                 "--gpus-per-node", "6", "--dry-run"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("mgrpo launch: error: ") and "rollout GPUs number 6" in err


def test_memory_overflow_exits_2_after_the_table(capsys, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    code = main(["launch", "--config", recipe_path(RECIPE), "--model-config", model_config_path(RECIPE),
                 "--dry-run", "parallel.tp=1", "launch.gpu_memory_gib=40"])
    captured = capsys.readouterr()
    assert code == 2
    assert "DOES NOT FIT" in captured.out
    assert "training GPU:" in captured.err and "does not fit" in captured.err


def test_vllm_servers_are_started_ready_for_the_trainer_to_attach(capsys, monkeypatch):
    """The trainer finds the servers through MGRPO_*_URLS and asks for them by pool name; vLLM
    only takes weight pushes with its dev routes on and our worker extension loaded."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert main(["launch", "--config", recipe_path(RECIPE), "--model-config", model_config_path(RECIPE),
                 "--dry-run", "rollout.engine=vllm"]) == 0
    lines = [line.strip() for line in capsys.readouterr().out.splitlines()]
    servers = [line for line in lines if "vllm.entrypoints.openai.api_server" in line]
    assert len(servers) == 8
    assert all("VLLM_SERVER_DEV_MODE=1" in s and "WeightSyncExtension" in s for s in servers)
    assert sum("--served-model-name policy" in s for s in servers) == 6
    assert sum("--served-model-name momentum" in s for s in servers) == 2
    (train,) = [line for line in lines if "torchrun" in line]
    urls = {kv.split("=")[0]: kv.split("=")[1].split(",") for kv in train.split() if kv.startswith("MGRPO_")}
    assert len(urls["MGRPO_POLICY_URLS"]) == 6 and len(urls["MGRPO_MOMENTUM_URLS"]) == 2


@pytest.mark.parametrize("flag", ["--nodes", "--gpus-per-node"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_zero_or_negative_cluster_sizes_are_refused_not_replaced(capsys, monkeypatch, flag, value):
    """0 used to be falsy and fell back to the config's launch.nodes / launch.gpus_per_node."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(SystemExit) as exit_:
        main(["launch", "--config", recipe_path(RECIPE), "--model-config", model_config_path(RECIPE),
              flag, value, "--dry-run"])
    assert exit_.value.code == 2
    assert f"argument {flag}: {value} must be > 0" in capsys.readouterr().err


def test_a_plan_that_does_not_fit_prints_no_command(capsys, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    code = main(["launch", "--config", recipe_path(RECIPE), "--model-config", model_config_path(RECIPE),
                 "--launcher", "srun", "--dry-run", "parallel.tp=1", "launch.gpu_memory_gib=40"])
    out = capsys.readouterr().out
    assert code == 2 and "DOES NOT FIT" in out and "commands: none, the plan does not fit" in out
    assert "srun" not in out and "torchrun" not in out


def test_hub_name_plans_without_model_config(capsys, monkeypatch):
    """Qwen/Qwen3-8B-Base is sized by the shipped examples/model_configs/Qwen3-8B-Base.json. Its recipe
    plans 2 training + 2 rollout nodes; on 2 nodes, one rollout node of 8 GPUs holds 6 policy + 2 momentum
    engines (the recipe's 12 + 4 would need 16 GPUs)."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert main(["launch", "--config", recipe_path("mgrpo_qwen3_8b_math.yaml"), "--nodes", "2", "--gpus-per-node",
                 "8", "--dry-run", "launch.rollout_nodes=1", "launch.policy_engines=6",
                 "launch.momentum_engines=2"]) == 0
    out = capsys.readouterr().out
    model = next(line for line in out.splitlines() if line.startswith("model "))
    assert "(no local copy: sized with the shipped " in model and "Qwen3-8B-Base.json, matched by name)" in model
    assert "1 training node(s), 1 rollout node(s)" in out and "fits" in out
    assert sum(line.startswith("  srun ") for line in out.splitlines()) == 9
