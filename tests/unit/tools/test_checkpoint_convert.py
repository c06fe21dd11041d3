"""tools/checkpoint/convert.py: Megatron-LM's arguments, mapped onto `mgrpo convert`."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tools.checkpoint.convert import build_parser, mgrpo_argv

ROOT = Path(__file__).parents[3]
TOOL = ROOT / "tools" / "checkpoint" / "convert.py"


def test_arguments_map_onto_mgrpo_convert():
    to_mgrpo = build_parser().parse_args(["--model-type", "GPT", "--loader", "hf", "--saver", "mgrpo", "--load-dir",
                                          "in", "--save-dir", "out", "--target-tensor-parallel-size", "2",
                                          "--target-expert-parallel-size", "4"])
    assert mgrpo_argv(to_mgrpo) == ["convert", "hf-to-megatron", "--hf", "in", "--out", "out", "--tp", "2",
                                    "--pp", "1", "--ep", "4"]
    to_hf = build_parser().parse_args(["--model-type", "GPT", "--loader", "mgrpo", "--saver", "hf", "--load-dir",
                                       "run", "--save-dir", "hf", "--momentum"])
    assert mgrpo_argv(to_hf) == ["convert", "megatron-to-hf", "--ckpt", "run", "--out", "hf",
                                 "--max-shard-size", "5GB", "--momentum"]
    same = build_parser().parse_args(["--model-type", "GPT", "--loader", "hf", "--saver", "hf", "--load-dir", "a",
                                      "--save-dir", "b"])
    with pytest.raises(SystemExit, match="convert between hf and mgrpo"):
        mgrpo_argv(same)


@pytest.mark.slow
def test_round_trip_through_the_tool_gives_back_the_weights(tmp_path):
    from megatron_mgrpo.models.builtin import resolve_model_path
    from megatron_mgrpo.models.loading import load_hf_model

    source = resolve_model_path("builtin:tiny-qwen3")
    for args in (["--loader", "hf", "--saver", "mgrpo", "--load-dir", str(source), "--save-dir", str(tmp_path / "run"),
                  "--target-pipeline-parallel-size", "2"],
                 ["--loader", "mgrpo", "--saver", "hf", "--load-dir", str(tmp_path / "run"),
                  "--save-dir", str(tmp_path / "hf")]):
        out = subprocess.run([sys.executable, str(TOOL), "--model-type", "GPT", *args], capture_output=True, text=True,
                             cwd=ROOT)
        assert out.returncode == 0, out.stderr[-2000:]
    original, back = load_hf_model(source).state_dict(), load_hf_model(tmp_path / "hf").state_dict()
    assert original.keys() == back.keys() and all(torch.equal(original[k], back[k]) for k in original)
