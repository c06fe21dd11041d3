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
