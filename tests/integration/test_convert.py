"""`mgrpo convert`: HF -> Megatron (any TP / PP / EP layout) -> HF is bit-exact through the CLI,
the exported directory loads in transformers with the same logits, the momentum copy exports, and
the config check rejects a mismatching directory or layout before writing anything."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from megatron_mgrpo.cli import main
from megatron_mgrpo.convert import SafetensorsDir
from megatron_mgrpo.parallel.ports import free_port
from tests.helpers import tiny

REPO = Path(__file__).resolve().parents[2]


def _hf_dir(path: Path, tokenizer, kind: str = "qwen3", tied: bool = False) -> Path:
    tiny(kind, tied=tied).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _mgrpo(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "megatron_mgrpo.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _assert_same_files(original: Path, exported: Path, scale: float = 1.0) -> None:
    before, after = SafetensorsDir(original), SafetensorsDir(exported)
    assert sorted(after) == sorted(before)
    for name in before:
        assert torch.equal(after[name], before[name] * scale), name


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("kind, tied, tp, pp, ep", [
    ("qwen3", False, 2, 1, 1), ("qwen3", True, 1, 2, 1), ("qwen2", False, 1, 1, 1), ("qwen3_moe", False, 2, 1, 1),
    # written by 2 EP ranks of 2 experts each, exported at EP=1: every expert back under its HF name
    # (Mixtral's expert names under EP: the unit tests of the weight map and the checks below)
    ("qwen3_moe", False, 1, 1, 2),
])
def test_hf_megatron_hf_round_trip_is_bit_exact(tmp_path, tokenizer, kind, tied, tp, pp, ep):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    original = _hf_dir(tmp_path / "hf", tokenizer, kind, tied)
    _mgrpo("convert", "hf-to-megatron", "--hf", str(original), "--out", str(tmp_path / "run"),
           "--tp", str(tp), "--pp", str(pp), "--ep", str(ep))
    ckpt = tmp_path / "run" / "checkpoints" / "step_000000"
    assert (ckpt / "complete.json").is_file() and (ckpt / "hf" / "config.json").is_file()
    assert len(list(ckpt.glob("*.distcp"))) >= tp * pp * ep  # every rank of the layout wrote its shard
    _mgrpo("convert", "megatron-to-hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "back"),
           "--max-shard-size", "100KB")
    exported = tmp_path / "back"
    assert (exported / "model.safetensors.index.json").is_file() and len(list(exported.glob("*.safetensors"))) > 1
    _assert_same_files(original, exported)

    ids = torch.randint(0, 101, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(original).eval()(input_ids=ids).logits
        logits = AutoModelForCausalLM.from_pretrained(exported).eval()(input_ids=ids).logits
    assert torch.equal(logits, expected)
    assert AutoTokenizer.from_pretrained(exported).get_vocab() == tokenizer.get_vocab()


def save_momentum(rank, world, port, run_dir):
    """Resume the converted checkpoint and save step 1 with a momentum copy of half the weights."""
    from megatron_mgrpo.models.hf_config import model_spec_from_hf
    from megatron_mgrpo.models.provider import build_gpt_model
    from megatron_mgrpo.parallel.dist import Launch, destroy_distributed, init_distributed
    from megatron_mgrpo.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

    init_distributed(launch=Launch(rank, world, rank, "127.0.0.1", port))
    try:
        latest = latest_checkpoint(run_dir)
        model = build_gpt_model(model_spec_from_hf(json.loads((latest / "hf" / "config.json").read_text())))
        load_checkpoint(latest, model)
        momentum = {name: p.detach() * 0.5 for name, p in model.named_parameters()}
        save_checkpoint(run_dir, 1, model, momentum=momentum, files_from=latest / "hf")
    finally:
        destroy_distributed()


@pytest.mark.slow
@pytest.mark.distributed
def test_momentum_exports_from_the_newest_checkpoint_of_a_run(tmp_path, tokenizer):
    original = _hf_dir(tmp_path / "hf", tokenizer)
    _mgrpo("convert", "hf-to-megatron", "--hf", str(original), "--out", str(tmp_path / "run"))
    mp.start_processes(save_momentum, args=(1, free_port(), str(tmp_path / "run")), nprocs=1, start_method="spawn")
    _mgrpo("convert", "megatron-to-hf", "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "ema"), "--momentum")
    _assert_same_files(original, tmp_path / "ema", scale=0.5)


@pytest.mark.parametrize("edit, pp, field", [
    ({"hidden_act": "gelu"}, 1, "hidden_act"),
    ({"intermediate_size": 128}, 1, "intermediate_size"),  # the tensors say 96
    ({"num_hidden_layers": 3, "layer_types": ["full_attention"] * 3}, 1, "num_hidden_layers=3"),  # files: 4
    ({"num_hidden_layers": 3}, 1, "num_hidden_layers"),  # transformers' own validation (layer_types has 4)
    ({}, 3, "num_hidden_layers=4"),  # 3 stages cannot split 4 layers
    ({"tie_word_embeddings": True}, 1, "tie_word_embeddings"),  # lm_head differs from the embedding
    ({"vocab_size": 50}, 1, "vocab_size"),
])
@pytest.mark.slow
def test_config_check_names_the_field_before_writing(tmp_path, tokenizer, capsys, edit, pp, field):
    hf = _hf_dir(tmp_path / "hf", tokenizer)
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, **edit}))
    out = tmp_path / "out"
    assert main(["convert", "hf-to-megatron", "--hf", str(hf), "--out", str(out), "--pp", str(pp)]) == 2
    assert field in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("kind, released_names, ep, message", [
    ("qwen3", False, 2, "--ep 2 splits the experts of a MoE model, and model_type=qwen3 in config.json is dense: "
                        "use --ep 1"),
    ("mixtral", False, 8, "--ep 8 must divide the number of experts, num_local_experts=4 in config.json: "
                          "use --ep 1, 2, 4"),
    ("qwen3_moe", True, 3, "--ep 3 must divide the number of experts, num_experts=4 in config.json: use --ep 1, 2, 4"),
])
def test_ep_check_names_the_option_before_writing(tmp_path, tokenizer, capsys, kind, released_names, ep, message):
    hf = _hf_dir(tmp_path / "hf", tokenizer, kind)
    if released_names:  # transformers writes num_local_experts; released Qwen3-MoE configs say num_experts
        config = json.loads((hf / "config.json").read_text())
        config["num_experts"] = config.pop("num_local_experts")
        (hf / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert main(["convert", "hf-to-megatron", "--hf", str(hf), "--out", str(out), "--ep", str(ep)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("kind, drop, field", [
    ("qwen3_moe", "model.layers.1.mlp.experts.3.up_proj.weight", "experts.3.up_proj"),
    ("mixtral", "model.layers.0.block_sparse_moe.gate.weight", "block_sparse_moe.gate"),
])
def test_tensor_check_covers_every_expert(tmp_path, tokenizer, capsys, kind, drop, field):
    """Each EP rank reads only its own experts: a missing one must fail the check, not one rank."""
    from safetensors.torch import save_file

    hf = _hf_dir(tmp_path / "hf", tokenizer, kind)
    tensors = SafetensorsDir(hf)
    kept = {name: tensors[name] for name in tensors if name != drop}
    save_file(kept, hf / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    assert main(["convert", "hf-to-megatron", "--hf", str(hf), "--out", str(out), "--ep", "2"]) == 2
    err = capsys.readouterr().err
    assert "missing [" in err and field in err
    assert not out.exists()
