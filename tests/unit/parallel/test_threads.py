import subprocess
import sys

import pytest

# Each case runs in a fresh interpreter: the OpenMP state under test is process-wide and lasts.
# "extra" counts the OS threads that appear while a helper thread copies a tensor far above torch's
# parallel grain size: the OpenMP team that copy starts for itself, if it may start one.
HELPER_THREAD = """
import os, threading, torch
from megatron_mgrpo.parallel.threads import confine_intra_op_threads
torch.set_num_threads(2)
confined = confine_intra_op_threads() if {confine} else None
tasks = lambda: len(os.listdir("/proc/self/task"))
seen, done = {{}}, threading.Event()
def work():
    seen["threads"], before = torch.get_num_threads(), tasks()
    torch.empty(1 << 22).copy_(torch.ones(1 << 22))
    seen["extra"] = tasks() - before
    done.set()
threading.Thread(target=work).start()
done.wait()
print(confined, torch.get_num_threads(), seen["threads"], seen["extra"])
"""

GLOO_ALL_GATHER = """
import os, torch
from megatron_mgrpo.parallel.dist import Launch, destroy_distributed, init_distributed
torch.set_num_threads(2)
init_distributed(launch=Launch(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port={port}))
tasks = lambda: len(os.listdir("/proc/self/task"))
flat = torch.ones(1 << 22)  # this thread's own team starts here
before = tasks()
torch.distributed.all_gather_into_tensor(torch.empty_like(flat), flat)  # copied out in a gloo worker thread
print(torch.get_num_threads(), tasks() - before)
destroy_distributed()
"""


def _run(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.split()


@pytest.mark.slow
def test_a_helper_thread_starts_an_openmp_team_of_its_own_unless_confined():
    # unconfined: the helper inherits 2 threads and its copy starts a second team (one new thread)
    assert _run(HELPER_THREAD.format(confine=False)) == ["None", "2", "2", "1"]
    # confined: the calling thread keeps 2, the helper gets 1 and starts no team
    assert _run(HELPER_THREAD.format(confine=True)) == ["True", "2", "1", "0"]


@pytest.mark.slow  # a fresh interpreter importing megatron-core
def test_gloo_worker_threads_start_no_openmp_team_after_init_distributed():
    from megatron_mgrpo.parallel.ports import free_port

    threads, extra = _run(GLOO_ALL_GATHER.format(port=free_port()))
    assert (threads, extra) == ("2", "0")
