"""The trainer's side of a weight-update process group shared with inference servers.

In disaggregated mode the trainer (rank 0) and every GPU rank of a server (ranks 1..world-1)
form their own process group, separate from the trainer's default one; the server joins when
asked over HTTP (SGLang's `/init_weights_update_group`), and for each bucket the HTTP request
names the tensors (names, dtypes, shapes) while rank 0 broadcasts them in that order. Both sides
must build the group the same way, or the rendezvous never completes: a TCP store at
`master_address:master_port` whose master is rank 0, keys prefixed with the group name, and the
backend's group made from that store. Nothing here is CUDA-specific, so the same code runs with
gloo on CPU (which is how it is tested) and with nccl on GPU.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta

import torch
import torch.distributed as dist


def join_weight_group(master_address: str, master_port: int, rank: int, world_size: int, group_name: str,
                      backend: str, timeout_s: float = 600.0) -> dist.ProcessGroup:
    """Join (rank 0: create) the group; blocks until all `world_size` ranks have joined.

    torch has no public call for a group outside the default world with its own store, so this
    uses `_new_process_group_helper`, the constructor `init_process_group` itself uses; the
    rank map is registered so the ordinary collectives accept the group.
    """
    from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world

    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(master_address, master_port, world_size, is_master=rank == 0, timeout=timeout)
    group, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), PrefixStore(group_name, store),
                                         group_name=group_name, timeout=timeout)
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


class WeightBroadcaster:
    """Rank 0 of a weight-update group: sends tensors to every server rank, in order."""

    def __init__(self, master_address: str, master_port: int, world_size: int, *, group_name: str = "mgrpo_weights",
                 backend: str = "nccl", device: str | torch.device = "cuda", timeout_s: float = 600.0):
        if world_size < 2:
            raise ValueError(f"world_size={world_size} must count the trainer and at least one server rank")
        self.master_address = master_address
        self.master_port = master_port
        self.world_size = world_size
        self.group_name = group_name
        self.backend = backend
        self.device = torch.device(device)
        self.timeout_s = timeout_s
        self.group: dist.ProcessGroup | None = None

    def connect(self) -> None:
        """Create the group; call while the servers are being asked to join (it blocks until they do)."""
        self.group = join_weight_group(self.master_address, self.master_port, 0, self.world_size, self.group_name,
                                       self.backend, self.timeout_s)

    def broadcast(self, tensors: Iterable[torch.Tensor]) -> None:
        """Send each tensor to all server ranks, in the order the update request named them."""
        if self.group is None:
            raise RuntimeError(f"weight group {self.group_name!r} is not connected: call connect() first")
        for tensor in tensors:
            dist.broadcast(tensor.detach().to(self.device).contiguous(), src=0, group=self.group)

    def close(self) -> None:
        if self.group is not None:
            dist.destroy_process_group(self.group)
            self.group = None
