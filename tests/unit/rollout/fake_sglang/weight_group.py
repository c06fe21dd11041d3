"""A server rank's end of the weight-update group, as SGLang builds it: a client of rank 0's TCP
store and the group made from it the same way rank 0 makes its own (`group_on_store`).

Used by the fake server (this directory is on its PYTHONPATH) and by
tests/unit/rollout/test_weight_broadcast.py.
"""

from datetime import timedelta

import torch.distributed as dist

from megatron_mgrpo.rollout.weight_broadcast import group_on_store


def join_weight_group(master_address: str, master_port: int, rank: int, world_size: int, group_name: str,
                      backend: str, timeout_s: float = 600.0) -> dist.ProcessGroup:
    """Join (rank 0: create) the group; blocks until all `world_size` ranks have joined."""
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(master_address, master_port, world_size, is_master=rank == 0, timeout=timeout)
    return group_on_store(store, rank, world_size, group_name, backend, timeout)
