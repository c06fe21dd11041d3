import subprocess
import sys

import pytest
import torch

from megatron_mgrpo.parallel import cpu_compat
from megatron_mgrpo.parallel.dist import Launch, first_slurm_host, launch_from_env


def test_compat_is_a_no_op_with_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cpu_compat, "_applied", False)
    before = torch.cuda.current_device
    assert cpu_compat.apply_cpu_compat() is False
    assert torch.cuda.current_device is before and cpu_compat._applied is False


def test_cpu_rng_streams_fork_and_restore():
    code = """
import torch
from megatron_mgrpo.parallel.cpu_compat import apply_cpu_compat
assert apply_cpu_compat() and apply_cpu_compat()  # idempotent
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
tracker = get_cuda_rng_tracker()
tracker.add("a", 1); tracker.add("b", 2)
torch.manual_seed(0); outer = torch.rand(3)
torch.manual_seed(0)
with tracker.fork("a"): first = torch.rand(3)
assert torch.equal(torch.rand(3), outer)          # the outer stream did not move
with tracker.fork("a"): second = torch.rand(3)
assert not torch.equal(first, second)             # the forked stream continues
assert torch.equal(first, torch.rand(3, generator=torch.Generator().manual_seed(1)))  # stream "a" is seed 1
assert torch.cuda.current_device() == torch.device("cpu")
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


@pytest.mark.parametrize("nodelist, first", [("node7", "node7"), ("a[01-04]", "a01"), ("gpu[12,15-16]", "gpu12"),
                                             ("x1,x2", "x1")])
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first
