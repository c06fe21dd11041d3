import re
import socket
import subprocess
import sys

import pytest
import torch

from megatron_mgrpo.parallel import cpu_compat
from megatron_mgrpo.parallel.dist import Launch, data_parallel_size, first_slurm_host, init_distributed, launch_from_env


def test_compat_is_a_no_op_with_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cpu_compat, "_applied", False)
    before = torch.cuda.current_device, torch.cuda.synchronize, torch.Tensor.cuda
    assert cpu_compat.apply_cpu_compat() is False
    assert (torch.cuda.current_device, torch.cuda.synchronize, torch.Tensor.cuda) == before
    assert cpu_compat._applied is False


@pytest.mark.slow  # a fresh interpreter importing megatron-core
def test_cpu_compat_is_narrow_and_rng_streams_fork():
    code = """
import torch
from megatron_mgrpo.parallel.cpu_compat import apply_cpu_compat
assert apply_cpu_compat() and apply_cpu_compat()  # idempotent
from megatron.core.pipeline_parallel import p2p_communication, schedules
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

def raises(call):
    try:
        call()
    except (AssertionError, RuntimeError):
        return True
    return False

# megatron's CUDA literals land on the CPU in the patched modules only
assert schedules.torch.zeros(2, device="cuda").device.type == "cpu"
assert schedules.torch.Tensor is torch.Tensor and schedules.torch.float32 is torch.float32
assert p2p_communication.torch.cuda.synchronize() is None
assert raises(lambda: torch.zeros(2, device="cuda")) and raises(torch.cuda.synchronize)
assert raises(lambda: torch.zeros(2).cuda())
assert torch.cuda.current_device() == torch.device("cpu") and not torch.cuda.is_available()

tracker = get_cuda_rng_tracker()
tracker.add("a", 1); tracker.add("b", 2)
torch.manual_seed(0); outer = torch.rand(3)
torch.manual_seed(0)
with tracker.fork("a"): first = torch.rand(3)
assert torch.equal(torch.rand(3), outer)          # the outer stream did not move
with tracker.fork("a"): second = torch.rand(3)
assert not torch.equal(first, second)             # the forked stream continues
assert torch.equal(first, torch.rand(3, generator=torch.Generator().manual_seed(1)))  # stream "a" is seed 1
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


def test_launch_from_torchrun_and_slurm():
    assert launch_from_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1",
                            "MASTER_PORT": "1234"}) == Launch(3, 8, 1, "n1", 1234)
    slurm = launch_from_env({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                             "SLURM_JOB_NODELIST": "gpu[003-004,010],cpu1"})
    assert (slurm.rank, slurm.world_size, slurm.local_rank, slurm.master_addr) == (9, 16, 1, "gpu003")
    assert launch_from_env({"MASTER_PORT": "1234"}) == Launch(0, 1, 0, "127.0.0.1", 1234)
    alone = launch_from_env({})  # a lone process takes a free port: two runs on one machine do not collide
    assert (alone.rank, alone.world_size, alone.master_addr) == (0, 1, "127.0.0.1")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", alone.master_port))


@pytest.mark.parametrize("nodelist, first", [("node7", "node7"), ("a[01-04]", "a01"), ("gpu[12,15-16]", "gpu12"),
                                             ("x1,x2", "x1")])
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


@pytest.mark.parametrize("world, sizes, dp", [(8, dict(tp=2, pp=2), 2), (8, dict(tp=2, ep=4), 4),
                                              (16, dict(tp=2, pp=2, cp=2, ep=2), 2), (1, {}, 1)])
def test_data_parallel_size(world, sizes, dp):
    assert data_parallel_size(world, **sizes) == dp


@pytest.mark.parametrize("world, sizes, message", [
    (6, dict(tp=4), "world size 6 is not divisible by parallel.tp=4 x parallel.pp=1 x parallel.cp=1 = 4"),
    (8, dict(tp=2, cp=3), "parallel.cp=3"),
    (4, dict(tp=2, ep=4), "world size 4 is not divisible by parallel.tp=2 x parallel.ep=4 x parallel.pp=1 = 8"),
    (4, dict(pp=0), "parallel.pp=0 must be >= 1"),
])
def test_layouts_that_do_not_fit_name_the_sizes(world, sizes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        data_parallel_size(world, **sizes)


def test_init_distributed_rejects_bad_settings_before_creating_groups():
    with pytest.raises(ValueError, match="backend='mpi' is not one of auto, nccl, gloo"):
        init_distributed(backend="mpi", launch=Launch(0, 1, 0, "127.0.0.1", 1))
    with pytest.raises(ValueError, match="parallel.tp=2"):
        init_distributed(tp=2, launch=Launch(0, 3, 0, "127.0.0.1", 1))
    assert not torch.distributed.is_initialized()
