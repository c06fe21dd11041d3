"""Intra-op threads for the thread that trains, not for the threads of the collective library.

On the CPU, torch runs its intra-op parallel work on OpenMP (libgomp) teams, and every OS thread
that starts such work gets a team of its own, sized by torch's process-wide thread count at the
moment that thread first runs intra-op work. gloo's worker threads do: `all_gather_into_tensor`
copies its result out in them, as megatron's distributed optimizer does after every step. From
then on the process keeps two teams, and once libgomp manages more threads than there are CPUs it
stops letting idle team threads spin between parallel regions: they sleep, and every later region
of the training thread pays for waking them. On 2 cores this made the whole RL step about 1.5x
slower (the in-process rollout 44 ms instead of 28) until the process ended.

`confine_intra_op_threads()` keeps the calling thread's count and makes 1 the count that threads
starting intra-op work later inherit; `init_distributed` calls it when it sets up gloo.
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def confine_intra_op_threads() -> bool:
    """Keep this thread's intra-op thread count, and give threads that start intra-op work later
    one thread each. Returns whether that holds now: False where torch is built without libgomp
    (or MKL without its thread-local setter), in which case nothing changes."""
    threads = torch.get_num_threads()  # completes this thread's own lazy set-up first
    if threads == 1:
        return True
    setters = _thread_local_setters()
    if setters is None:
        log.debug("torch has no libgomp / MKL thread-local setters here: intra-op threads left as they are")
        return False
    torch.set_num_threads(1)  # the process-wide count, which threads read when they start intra-op work
    for set_this_thread in setters:  # MKL's first: it resets this thread's OpenMP count
        set_this_thread(threads)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
        return False
    return True


def _thread_local_setters() -> list | None:
    """The setters of the calling thread's own MKL and OpenMP thread counts, from the libraries
    torch itself loaded (a second copy of libgomp elsewhere would be a different runtime)."""
    if not torch.backends.openmp.is_available():
        return None
    lib = Path(torch.__file__).parent / "lib"
    gomp = sorted(lib.glob("libgomp*.so*"))
    if not gomp:
        return None
    try:
        setters = [_loaded(gomp[0]).omp_set_num_threads]
        if torch.backends.mkl.is_available():
            setters.insert(0, _loaded(lib / "libtorch_cpu.so").MKL_Set_Num_Threads_Local)
    except (OSError, AttributeError):
        return None
    return setters


def _loaded(path: Path) -> ctypes.CDLL:
    """A handle on a library already in this process (never loads a second copy)."""
    return ctypes.CDLL(str(path), mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
