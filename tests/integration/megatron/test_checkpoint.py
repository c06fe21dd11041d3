"""Distributed checkpoints with real gloo processes: resharding (TP=2 -> 1, PP=2 -> 1, EP=2 <-> 1,
EP=2 -> 4) of weights, momentum and optimizer state, common and RNG state, retention, and saves
killed half-way."""

import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_mgrpo.parallel.ports import free_port
from tests.helpers import tiny
from tests.integration.megatron.test_logits_vs_hf import full_logits

REPO = Path(__file__).resolve().parents[3]
SEQ_LEN = 16
STEP = 5
COMMON = {"data_position": 40, "epoch": 1}


def _start(rank: int, world: int, tp: int, pp: int, port: int, ep: int = 1):
    from megatron_mgrpo.parallel.dist import Launch, init_distributed

    init_distributed(tp=tp, pp=pp, ep=ep, launch=Launch(rank, world, rank, "127.0.0.1", port))


def _build(kind: str, tied: bool, tp: int, pp: int, ep: int = 1):
    """(HF reference, spec, this rank's Megatron stage with random weights)."""
    from megatron.core import parallel_state as ps

    from megatron_mgrpo.models.hf_config import model_spec_from_hf
    from megatron_mgrpo.models.provider import build_gpt_model

    hf = tiny(kind, tied=tied).eval()
    spec = model_spec_from_hf(hf.config, tp=tp)
    stage = ps.get_pipeline_model_parallel_rank()
    return hf, spec, build_gpt_model(spec, tp=tp, pp=pp, ep=ep, pre_process=stage == 0, post_process=stage == pp - 1)


def _local(hf_tensors: dict, spec) -> dict:
    """This rank's Megatron shard of full HF tensors."""
    from megatron.core import parallel_state as ps

    from megatron_mgrpo.models.weight_map import hf_to_megatron

    return hf_to_megatron(hf_tensors, spec, tp_rank=ps.get_tensor_model_parallel_rank(),
                          tp_size=ps.get_tensor_model_parallel_world_size(),
                          pp_rank=ps.get_pipeline_model_parallel_rank(),
                          pp_size=ps.get_pipeline_model_parallel_world_size(),
                          ep_rank=ps.get_expert_model_parallel_rank(),
                          ep_size=ps.get_expert_model_parallel_world_size())


def _momentum_hf(hf) -> dict:
    """A stand-in EMA copy that differs from the weights in every tensor."""
    return {name: tensor * -0.5 + 0.125 for name, tensor in hf.state_dict().items()}


def _logits(model, pp: int):
    ids = torch.randint(0, 101, (2, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    return full_logits(model.eval(), ids, torch.arange(SEQ_LEN)[None].expand(2, SEQ_LEN), pp)


def _with_optimizer(model):
    """(DDP-wrapped model, megatron's distributed AdamW, its scheduler), as training builds them."""
    from megatron_mgrpo.config import TrainConfig
    from megatron_mgrpo.train.optimizer import build_optimizer, wrap_ddp

    ddp = wrap_ddp(model)
    optimizer, scheduler = build_optimizer([ddp], TrainConfig(lr=1e-3, lr_warmup_steps=0), torch.float32)
    return ddp, optimizer, scheduler


def save_worker(rank, world, tp, pp, ep, port, run_dir, kind, tied, train):
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    from megatron_mgrpo.models.provider import load_hf_weights
    from megatron_mgrpo.parallel.dist import destroy_distributed
    from megatron_mgrpo.train.checkpoint import save_checkpoint

    _start(rank, world, tp, pp, port, ep)
    try:
        hf, spec, model = _build(kind, tied, tp, pp, ep)
        load_hf_weights(model, hf.state_dict(), spec)
        optimizer = scheduler = None
        chunk = model
        if train:
            chunk, optimizer, scheduler = _with_optimizer(model)
            ids = torch.randint(0, 101, (2, SEQ_LEN), generator=torch.Generator().manual_seed(1))
            chunk(ids, torch.arange(SEQ_LEN)[None].expand(2, SEQ_LEN), attention_mask=None).pow(2).mean().backward()
            # the reduction the schedule runs (DP grads, and the TP all-reduce that keeps the replicated
            # q/k norms of different head shards identical: skipped, the replicas drift apart)
            finalize_model_grads([chunk], num_tokens=torch.tensor(1))
            assert optimizer.step()[0]
            scheduler.step(1)
        momentum = _local(_momentum_hf(hf), spec)
        save_checkpoint(run_dir, STEP, [chunk], optimizer=optimizer, scheduler=scheduler, momentum=momentum,
                        common=COMMON)
        logits = _logits(model, pp)
        if logits is not None and rank == world - 1:
            torch.save(logits, Path(run_dir) / "logits.pt")
    finally:
        destroy_distributed()


def load_worker(rank, world, tp, pp, ep, port, run_dir, kind, tied, train):
    from megatron.core import dist_checkpointing

    from megatron_mgrpo.parallel.dist import destroy_distributed
    from megatron_mgrpo.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

    _start(rank, world, tp, pp, port, ep)
    try:
        hf, spec, model = _build(kind, tied, tp, pp, ep)
        optimizer = scheduler = None
        chunk = model
        if train:
            chunk, optimizer, scheduler = _with_optimizer(model)
        momentum = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
        loaded = load_checkpoint(latest_checkpoint(run_dir), [chunk], optimizer=optimizer, scheduler=scheduler,
                                 momentum=momentum)
        assert loaded.step == STEP and loaded.common == COMMON
        assert not loaded.rng_restored  # another layout: per-rank RNG streams do not carry over
        if train:
            assert scheduler.num_steps == 1
        else:  # the untrained weights are exactly the HF ones, resharded
            weights = model.state_dict()
            for name, tensor in _local(hf.state_dict(), spec).items():
                assert torch.equal(weights[name], tensor), name
        expected_momentum = _local(_momentum_hf(hf), spec)
        for name, tensor in momentum.items():
            assert torch.equal(tensor, expected_momentum[name]), name
        # saved again under this layout, every global tensor (weights, momentum, Adam moments) is the same
        again = save_checkpoint(run_dir, STEP + 1, [chunk], optimizer=optimizer, scheduler=scheduler,
                                momentum=momentum, common=COMMON)
        before = dist_checkpointing.load_plain_tensors(str(loaded.path))
        after = dist_checkpointing.load_plain_tensors(str(again))
        tensors = [key for key, value in before.items() if isinstance(value, torch.Tensor)]
        assert any(key.startswith("momentum.") for key in tensors)
        # a MoE model at EP>1 has a dense and an expert optimizer, whose keys start with chained_<i>.
        assert any(".optimizer.state.exp_avg." in f".{key}" for key in tensors) == train
        for key in tensors:
            assert_same_up_to_vocab_padding(before[key], after[key], key)
        logits = _logits(model, pp)
        if logits is not None:
            saved = torch.load(Path(run_dir) / "logits.pt")
            diff = (logits[..., :spec.vocab_size] - saved[..., :spec.vocab_size]).abs().max().item()
            print(f"{kind} loaded at TP={tp} PP={pp} EP={ep}: max |logits - saved layout's| = {diff:.2e}")
            assert diff <= 1e-5
    finally:
        destroy_distributed()


def assert_same_up_to_vocab_padding(a: torch.Tensor, b: torch.Tensor, key: str) -> None:
    """Equal tensors, except that the vocabulary padding (which depends on TP) may differ in rows."""
    if a.shape != b.shape:
        rows = min(a.shape[0], b.shape[0])
        assert not a[rows:].any() and not b[rows:].any(), f"{key}: non-zero vocabulary padding"
        a, b = a[:rows], b[:rows]
    assert torch.equal(a, b), key


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("saved, loaded, kind, tied, train", [  # layouts: (tp, pp, ep, dp), tp * pp * dp ranks
    ((2, 1, 1, 1), (1, 1, 1, 1), "qwen3", False, True),  # with DDP, the distributed optimizer and its scheduler
    ((1, 2, 1, 1), (1, 1, 1, 1), "qwen3", True, False),  # tied embeddings: the last stage's copy is a replica
    # MoE: the experts of 2 EP ranks into one, and one rank's 4 experts onto 2 EP ranks on as many
    # processes (only EP changes: the RNG is not restored); the optimizer cannot cross EP=1 <-> EP>1
    # in megatron-core 0.16.1 (see load_checkpoint), so the Adam moments reshard between EP=2 and 4
    ((1, 1, 2, 2), (1, 1, 1, 1), "qwen3_moe", False, False),
    ((1, 1, 2, 2), (1, 1, 1, 1), "qwen3_moe", False, True),
    ((1, 1, 1, 2), (1, 1, 2, 2), "qwen3_moe", False, False),
    ((1, 1, 2, 2), (1, 1, 4, 4), "qwen3_moe", False, True),
])
def test_checkpoint_reshards_weights_momentum_and_optimizer(tmp_path, saved, loaded, kind, tied, train):
    for (tp, pp, ep, dp), worker in ((saved, save_worker), (loaded, load_worker)):
        world = tp * pp * dp
        mp.start_processes(worker, args=(world, tp, pp, ep, free_port(), str(tmp_path), kind, tied, train),
                           nprocs=world, start_method="spawn")


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def retention_worker(rank, world, port, run_dir):
    from megatron_mgrpo.parallel.dist import destroy_distributed
    from megatron_mgrpo.train.checkpoint import (
        complete_checkpoints,
        latest_checkpoint,
        load_checkpoint,
        save_checkpoint,
    )

    _start(rank, world, 1, 1, port)
    try:
        _, _, model = _build("qwen3", False, 1, 1)
        for step in range(1, 5):
            save_checkpoint(run_dir, step, model, common={"data_position": 10 * step}, keep_last=2)
        assert [p.name for p in complete_checkpoints(run_dir)] == ["step_000003", "step_000004"]
        root = Path(run_dir) / "checkpoints"
        (root / "step_000009.tmp-123").mkdir()  # left by a killed save
        (root / "step_000010").mkdir()  # copied half-way: no completion marker
        assert latest_checkpoint(run_dir).name == "step_000004"

        sgd = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        scheduler = torch.optim.lr_scheduler.StepLR(sgd, step_size=1, gamma=0.5)
        for _ in range(3):
            sgd.step()
            scheduler.step()
        save_checkpoint(run_dir, 5, model, scheduler=scheduler, common={"data_position": 50}, keep_last=2)
        assert not (root / "step_000009.tmp-123").exists(), "a later save removes leftovers of killed saves"
        assert sorted(p.name for p in root.iterdir()) == ["step_000004", "step_000005", "step_000010"]
        expected_draws = _draws()
        with torch.no_grad():
            for param in model.parameters():
                param.zero_()
        fresh = torch.optim.lr_scheduler.StepLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0),
                                                step_size=1, gamma=0.5)
        loaded = load_checkpoint(latest_checkpoint(run_dir), model, scheduler=fresh)
        assert loaded.step == 5 and loaded.common == {"data_position": 50} and loaded.rng_restored
        assert _draws() == expected_draws
        assert fresh.get_last_lr() == scheduler.get_last_lr() == [0.125]
        assert all(param.any() for param in model.parameters())

        with pytest.raises(ValueError, match="saved without the momentum"):
            load_checkpoint(loaded.path, model, momentum={})
        partial = {name: p.detach().clone() for name, p in model.named_parameters() if "layers.0." not in name}
        with pytest.raises(ValueError, match=r"missing \['decoder.layers.0"):
            save_checkpoint(run_dir, 6, model, momentum=partial)
        with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
            load_checkpoint(root / "step_000010", model)
        with pytest.raises(ValueError, match="keep_last=0"):
            save_checkpoint(run_dir, 6, model, keep_last=0)
        assert latest_checkpoint(run_dir).name == "step_000005"
    finally:
        destroy_distributed()


@pytest.mark.slow
@pytest.mark.distributed
def test_common_state_rng_retention_and_latest(tmp_path):
    mp.start_processes(retention_worker, args=(1, free_port(), str(tmp_path)), nprocs=1, start_method="spawn")


KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path

    import torch

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    def main(run_dir, kill_point, port):
        from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

        from megatron_mgrpo.models.hf_config import model_spec_from_hf
        from megatron_mgrpo.models.provider import build_gpt_model, load_hf_weights
        from megatron_mgrpo.parallel.dist import Launch, init_distributed
        from megatron_mgrpo.train.checkpoint import save_checkpoint
        from tests.helpers import tiny

        init_distributed(launch=Launch(0, 1, 0, "127.0.0.1", port))
        hf = tiny("qwen3")
        spec = model_spec_from_hf(hf.config)
        model = build_gpt_model(spec)
        load_hf_weights(model, hf.state_dict(), spec)
        save_checkpoint(run_dir, 1, model)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(1.0)
        if kill_point == "writing":  # after common.pt, before any tensor file
            FileSystemWriterAsync.write_preloaded_data_multiproc = staticmethod(die)
        else:  # every file written, the rename to the final name never happens
            rename = Path.rename
            Path.rename = lambda path, target: die() if Path(target).name == "step_000002" else rename(path, target)
        save_checkpoint(run_dir, 2, model)

    if __name__ == "__main__":
        main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
""")


def reload_worker(rank, world, port, run_dir):
    from megatron_mgrpo.parallel.dist import destroy_distributed
    from megatron_mgrpo.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

    _start(rank, world, 1, 1, port)
    try:
        hf, spec, model = _build("qwen3", False, 1, 1)
        assert load_checkpoint(latest_checkpoint(run_dir), model).step == 1
        weights = model.state_dict()
        for name, tensor in _local(hf.state_dict(), spec).items():
            assert torch.equal(weights[name], tensor), name
        save_checkpoint(run_dir, 2, model)
        assert sorted(p.name for p in (Path(run_dir) / "checkpoints").iterdir()) == ["step_000001", "step_000002"]
    finally:
        destroy_distributed()


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("kill_point", ["writing", "rename"])
def test_save_killed_half_way_leaves_the_previous_checkpoint(tmp_path, kill_point):
    script = tmp_path / "killed_save.py"
    script.write_text(KILLED_SAVE)
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    log = tmp_path / "killed_save.log"
    with log.open("w") as out:  # a file, not a pipe: the orphaned helper processes of the save keep pipes open
        child = subprocess.Popen([sys.executable, str(script), str(run_dir), kill_point, str(free_port())],
                                 cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = child.wait(timeout=300)
        finally:  # the killed process's helpers (the writer's queue manager) go with its session
            os.killpg(child.pid, signal.SIGKILL)
    assert returncode == -signal.SIGKILL, log.read_text()[-3000:]
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names[0] == "step_000001" and len(names) == 2 and names[1].startswith("step_000002.tmp-"), names
    if kill_point == "rename":  # the temporary directory holds a finished save, yet is never picked
        assert (run_dir / "checkpoints" / names[1] / "complete.json").is_file()
    mp.start_processes(reload_worker, args=(1, free_port(), str(run_dir)), nprocs=1, start_method="spawn")


def corrupt_newest_worker(rank, world, port, run_dir):
    from megatron_mgrpo.parallel.dist import destroy_distributed
    from megatron_mgrpo.train import CheckpointError
    from megatron_mgrpo.train.checkpoint import load_latest_checkpoint, save_checkpoint

    _start(rank, world, world, 1, port)
    try:
        _, _, model = _build("qwen3", False, world, 1)
        root = Path(run_dir) / "checkpoints"
        saved = {}
        for step in (1, 2, 3):
            with torch.no_grad():
                for param in model.parameters():
                    param.add_(1.0)
            saved[step] = {name: p.detach().clone() for name, p in model.named_parameters()}
            save_checkpoint(run_dir, step, model, common={"data_position": 10 * step})

        def cut_off(step: int) -> None:  # the last rank's shard file loses its second half (a full disk)
            dist.barrier()
            if rank == 0:
                shard = root / f"step_{step:06d}" / f"__{world - 1}_0.distcp"
                os.truncate(shard, shard.stat().st_size // 2)
            dist.barrier()

        cut_off(3)
        messages = []
        loaded = load_latest_checkpoint(run_dir, model, say=messages.append)
        assert loaded.step == 2 and loaded.common == {"data_position": 20}
        for name, param in model.named_parameters():
            assert torch.equal(param, saved[2][name]), name
        assert sorted(p.name for p in root.iterdir()) == ["step_000001", "step_000002", "step_000003.corrupt-1"]
        unreadable, resumed = messages
        assert unreadable.startswith(f"cannot read {root / 'step_000003'}: __{world - 1}_0.distcp (cut off: ")
        assert unreadable.endswith("EOFError; trying the previous checkpoint")
        assert resumed == "moved the unreadable checkpoints aside: step_000003 -> step_000003.corrupt-1"

        dist.barrier()  # every rank has looked before the next save adds its temporary directory
        save_checkpoint(run_dir, 3, model)  # a damaged step saved again is moved aside under the next number
        cut_off(3)
        assert load_latest_checkpoint(run_dir, model, say=lambda message: None).step == 2
        assert (root / "step_000003.corrupt-2").is_dir()

        cut_off(2)
        cut_off(1)
        with pytest.raises(CheckpointError, match=r"no checkpoint of .* loads \(cannot read .*step_000002: .*; "
                                                  r"cannot read .*step_000001: .*\): check that model.path"):
            load_latest_checkpoint(run_dir, model, say=lambda message: None)
        assert sorted(p.name for p in root.iterdir()) == [  # when none loads, nothing is moved
            "step_000001", "step_000002", "step_000003.corrupt-1", "step_000003.corrupt-2"]
    finally:
        destroy_distributed()


@pytest.mark.slow
@pytest.mark.distributed
def test_a_damaged_newest_checkpoint_is_moved_aside_and_the_previous_one_loads(tmp_path):
    """Only the last TP rank reads the cut-off file; both ranks agree to fall back all the same."""
    mp.start_processes(corrupt_newest_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
