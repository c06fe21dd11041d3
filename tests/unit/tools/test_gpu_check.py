"""The GPU check kit on CPU: the FLOPs count, the dry run's checks, the offline install, and (slow)
every part of the runner on a tiny model, so that a lent GPU's minutes are not spent on the kit's bugs."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from megatron_mgrpo.models.hf_config import ModelSpec
from tools.gpu_check import run
from tools.gpu_check.flops import peak_bf16_flops, train_flops_per_token

RUNNER = Path(run.__file__)


def spec(**changes) -> ModelSpec:
    fields = dict(model_type="qwen3", num_layers=2, hidden_size=8, num_heads=2, num_query_groups=1, head_dim=4,
                  ffn_hidden_size=16, vocab_size=100, padded_vocab_size=128, max_position_embeddings=64,
                  rope_theta=1e4, rope_scaling_factor=None, norm_eps=1e-6, qk_layernorm=True, qkv_bias=False,
                  tied_embeddings=False)
    return ModelSpec(**{**fields, **changes})


def test_train_flops_match_a_hand_count():
    # per layer: q 8x8, k 8x4, v 8x4, o 8x8, SwiGLU 3 x 8x16 = 64 + 32 + 32 + 64 + 384 = 576 weights;
    # 2 layers + LM head 8 x 128 (padded) = 1152 + 1024 = 2176 weights -> 4352 forward FLOPs per token;
    # attention at s = 9: 2 layers x 4 x (2 heads x 4) x keys, keys = 5 causal, 9 full
    assert train_flops_per_token(spec(), seq_len=9) == 3 * (4352 + 2 * 4 * 8 * 5)
    assert train_flops_per_token(spec(), seq_len=9, causal=False) == 3 * (4352 + 2 * 4 * 8 * 9)


def test_flops_refuse_moe_and_know_the_h100():
    with pytest.raises(ValueError, match="dense models only"):
        train_flops_per_token(spec(num_experts=4), seq_len=8)
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert peak_bf16_flops("Some other GPU") is None


def test_the_device_model_is_about_one_billion_parameters():
    m = run.MODEL
    h, layers = m["hidden_size"], m["num_hidden_layers"]
    attention = h * m["num_attention_heads"] * m["head_dim"] * 2 + h * m["num_key_value_heads"] * m["head_dim"] * 2
    params = layers * (attention + 3 * h * m["intermediate_size"]) + 2 * h * m["vocab_size"]
    assert 0.9e9 < params < 1.2e9


def test_the_plan_fits_in_eight_minutes():
    assert sum(part.budget_s for part in run.PARTS) + 30 <= 8 * 60


def fake_wheel(folder: Path, name: str, version: str, modules: list[str], top_level: bool) -> Path:
    """A wheel file with `modules` in its RECORD (and top_level.txt if asked), as pip download saves it."""
    dist = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        files = {f"{module}/__init__.py": "" for module in modules}
        files[f"{dist}.dist-info/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        files[f"{dist}.dist-info/WHEEL"] = ("Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                            "Tag: py3-none-any\n")
        if top_level:
            files[f"{dist}.dist-info/top_level.txt"] = "\n".join(modules) + "\n"
        files[f"{dist}.dist-info/RECORD"] = "".join(f"{n},,\n" for n in files) + f"{dist}.dist-info/RECORD,,\n"
        for file_name, text in files.items():
            archive.writestr(file_name, text)
    return path


def test_wheel_modules_from_top_level_or_record(tmp_path):
    listed = fake_wheel(tmp_path, "a-pkg", "1.0", ["alpha", "beta"], top_level=True)
    assert run.wheel_modules(listed) == {"alpha", "beta"}
    assert run.wheel_modules(fake_wheel(tmp_path, "b-pkg", "1.0", ["gamma"], top_level=False)) == {"gamma"}


def test_the_fetch_list_has_megatron_core_and_covers_the_needed_modules():
    packages = run.wheel_packages()
    assert packages["megatron-core"] == "0.16.1"
    assert {"omegaconf", "psutil", "pytest", "xxhash"} <= set(packages)


def dry_run(wheels: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RUNNER), "--dry-run", "--wheels", str(wheels)], capture_output=True,
                          text=True, timeout=120)


def test_dry_run_without_wheels_says_how_to_fetch_them(tmp_path):
    result = dry_run(tmp_path)
    assert result.returncode == 1
    assert "error: wheel missing: megatron-core==0.16.1" in result.stdout
    assert "fetch the wheels with: tools/gpu_check/fetch_wheels.sh" in result.stdout
    assert "dry run: NOT ready" in result.stdout
    assert "plan (on the device):" in result.stdout and "checkpoint" in result.stdout


def test_dry_run_with_every_wheel_is_ready(tmp_path):
    modules = {"megatron-core": ["megatron"], "antlr4-python3-runtime": ["antlr4"], "math-verify": ["math_verify"],
               "pytest": ["pytest", "_pytest"]}
    for name, version in run.wheel_packages().items():
        fake_wheel(tmp_path, name, version, modules.get(name, [name.replace("-", "_").lower()]), top_level=False)
    result = dry_run(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "dry run: ready" in result.stdout
    assert "MiB carried (limit 64 MiB)" in result.stdout


def test_dry_run_names_a_module_no_wheel_provides(tmp_path):
    for name, version in run.wheel_packages().items():
        fake_wheel(tmp_path, name, version, ["unrelated_" + name.replace("-", "_")], top_level=True)
    result = dry_run(tmp_path)
    assert result.returncode == 1
    assert "error: no wheel provides the modules megatron, omegaconf" in result.stdout


def test_install_wheels_offline_into_a_folder(tmp_path, monkeypatch):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    fake_wheel(wheels, "gpu-check-probe", "1.0", ["gpu_check_probe"], top_level=True)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "")
    run.install_wheels(wheels, tmp_path / "target")
    assert (tmp_path / "target" / "gpu_check_probe" / "__init__.py").is_file()
    assert sys.path[0] == str(tmp_path / "target")
    with pytest.raises(FileNotFoundError, match="no wheels in"):
        run.install_wheels(tmp_path / "empty", tmp_path / "target2")


@pytest.mark.slow
def test_every_part_runs_on_a_tiny_model_on_cpu(tmp_path):
    """~1-2 minutes: the bf16 EMA compiles, the checkpoint is written through megatron's dist_checkpointing."""
    result = subprocess.run([sys.executable, str(RUNNER), "--smoke", "--out", str(tmp_path)], capture_output=True,
                            text=True, timeout=600)
    results = json.loads((tmp_path / "results.json").read_text())
    statuses = {name: part["status"] for name, part in results["parts"].items()}
    assert statuses == {part.name: "ok" for part in run.PARTS}, (statuses, result.stderr[-3000:])
    assert results["parts"]["logits"]["relative_l2_error"]["megatron_fp32_vs_hf_fp32"] < 1e-5
    assert results["parts"]["train"]["tokens_per_s"] > 0
    assert results["parts"]["export"]["weights_equal"] and results["parts"]["checkpoint"]["weights_equal"]
    assert (tmp_path / "log.txt").is_file()
