"""Every bad input a user can give the CLI: exit code 2, one line that names the field, the value
and the fix, printed before any expensive work, and nothing written (or lost) on disk.

Each case is (arguments, words the message must contain); `{tmp}` is the test's directory, which
holds the inputs below. Cases marked slow spawn processes (checkpoint conversion)."""

import json
import os
import shutil

import pytest

from megatron_mgrpo.cli import main
from megatron_mgrpo.models.builtin import resolve_model_path

TRAIN = ["train", "--out", "{tmp}/run", "warmstart.steps=0", "train.steps=1"]

CASES = {
    # configuration
    "misspelt key": (["config", "show", "algo.momentom=0.9"], ["did you mean 'algo.momentum'"]),
    "value out of range": (["config", "show", "algo.momentum=1.5"], ["algo.momentum", "1.5"]),
    "YAML syntax error": (["config", "show", "--config", "{tmp}/broken.yaml"],
                          ["broken.yaml", "is not valid YAML at line 3"]),
    "config is a directory": (["config", "show", "--config", "{tmp}"], ["is a directory: pass a YAML file"]),
    "missing config": (["train", "--config", "{tmp}/nope.yaml"], ["nope.yaml", "does not exist"]),
    # layout against the model, before any process group
    "tp not dividing the heads": (TRAIN + ["parallel.tp=3"], ["parallel.tp=3 must divide the 4 attention heads"]),
    "pp not dividing the layers": (TRAIN + ["parallel.pp=3"], ["parallel.pp=3 must divide the 4 layers"]),
    "ep on a dense model": (TRAIN + ["parallel.ep=2"], ["parallel.ep=2 needs a mixture-of-experts model"]),
    "layout larger than the job": (TRAIN + ["parallel.pp=2"], ["world size 1 is not divisible by", "parallel.pp=2"]),
    # data, before the warm start
    "empty data file": (TRAIN + ["data.path={tmp}/empty.jsonl"], ["empty.jsonl", "no usable prompts"]),
    "text named .parquet": (TRAIN + ["data.path={tmp}/fake.parquet"], ["fake.parquet' is not a parquet file"]),
    "prompt longer than the context": (TRAIN + ["data.path={tmp}/long.jsonl", "eval.prompts=0"],
                                       ["1 prompt(s) of data.path are longer than launch.max_prompt_tokens=1024",
                                        "'huge'", "raise launch.max_prompt_tokens"]),
    "response longer than the context": (TRAIN + ["rollout.max_new_tokens=1500"],
                                         ["launch.max_prompt_tokens=1024 + rollout.max_new_tokens=1500",
                                          "2048 positions"]),
    # models
    "eval: weights of another architecture": (["eval", "--model", "{tmp}/neox", "--data", "builtin:arithmetic",
                                               "--out", "{tmp}/eval.json"],
                                              ["do not fit the architecture", "GPTNeoXForCausalLM", "missing",
                                               "unexpected"]),
    "eval: truncated safetensors": (["eval", "--model", "{tmp}/truncated", "--data", "builtin:arithmetic",
                                     "--out", "{tmp}/eval.json"],
                                    ["truncated/model.safetensors cannot be read", "truncated or corrupt"]),
    "convert: truncated safetensors": (["convert", "hf-to-megatron", "--hf", "{tmp}/truncated", "--out",
                                        "{tmp}/converted"], ["truncated/model.safetensors cannot be read"]),
    "eval: missing data file": (["eval", "--model", "builtin:tiny-qwen3", "--data", "{tmp}/nope.jsonl",
                                 "--out", "{tmp}/eval.json"], ["nope.jsonl"]),
    # data preparation
    "preprocess: no usable row": (["preprocess", "--input", "{tmp}/nofield.jsonl", "--output", "{tmp}/o.jsonl"],
                                  ["no prompts written", "missing question", "--question-field"]),
    # launch
    "launch: zero nodes": (["launch", "--config", "examples/configs/mgrpo_qwen3_4b_math.yaml", "--nodes", "0",
                            "--dry-run"], ["--nodes", "0 must be > 0"]),
    "convert: momentum of a checkpoint without one": (
        ["convert", "megatron-to-hf", "--ckpt", "{tmp}/converted", "--out", "{tmp}/hf", "--momentum"],
        ["holds no momentum copy", "drop --momentum"]),
}
SLOW = {"convert: momentum of a checkpoint without one"}  # writes a checkpoint first (processes)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("inputs")
    (tmp / "broken.yaml").write_text("train:\n  steps: [1\n")
    (tmp / "empty.jsonl").write_text("")
    (tmp / "fake.parquet").write_text('{"question": "1+1", "answer": "2"}\n')
    (tmp / "nofield.jsonl").write_text('{"foo": 1}\n')
    rows = [{"id": f"q{i}", "question": f"{i} + {i}", "answer": str(2 * i)} for i in range(40)]
    rows.append({"id": "huge", "question": "1 + " * 2000 + "1", "answer": "2001"})
    (tmp / "long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = resolve_model_path("builtin:tiny-qwen3")
    shutil.copytree(model, tmp / "neox")
    config = json.loads((tmp / "neox" / "config.json").read_text())
    (tmp / "neox" / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox",
                                                          "architectures": ["GPTNeoXForCausalLM"]}))
    shutil.copytree(model, tmp / "truncated")
    weights = tmp / "truncated" / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    return tmp


def exit_code(argv: list[str]) -> int:
    """`mgrpo argv` in this process; argparse's own errors exit with 2 through SystemExit."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in CASES])
def test_bad_input_is_one_line_and_writes_nothing(name, inputs, capsys, monkeypatch, request):
    args, words = CASES[name]
    if name in SLOW:
        hf = str(resolve_model_path("builtin:tiny-qwen3"))
        assert main(["convert", "hf-to-megatron", "--hf", hf, "--out", str(inputs / "converted")]) == 0
        capsys.readouterr()
    monkeypatch.chdir(request.config.rootpath)  # launch reads examples/ relative to the checkout
    before = sorted(p.relative_to(inputs) for p in inputs.rglob("*"))
    assert exit_code([a.replace("{tmp}", str(inputs)) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    message = err.splitlines()[-1]  # above it only argparse's usage, or train's note on the embedded preset
    assert message.startswith("mgrpo ") and ": error: " in message and "Traceback" not in err, err
    for word in words:
        assert word in message, (word, message)
    assert sorted(p.relative_to(inputs) for p in inputs.rglob("*")) == before  # nothing written, nothing lost
