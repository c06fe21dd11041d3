"""The trainer's side of a weight-update process group shared with inference servers.

In disaggregated mode the trainer (rank 0) and every GPU rank of a pool's servers (server i's
ranks from its `rank_offset` on, together 1..world-1) form their own process group, separate from
the trainer's default one; each server joins when asked over HTTP (SGLang's
`/init_weights_update_group`), and for each bucket the HTTP requests name the tensors (names,
dtypes, shapes) while rank 0 broadcasts them in that order, once for all the servers. Both sides
must build the group the same way, or the rendezvous never completes: a TCP store at
`master_address:master_port` whose master is rank 0, keys prefixed with the group name, and the
backend's group made from that store. Nothing here is CUDA-specific, so the same code runs with
gloo on CPU (which is how it is tested) and with nccl on GPU.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Mapping
from datetime import timedelta

import torch
import torch.distributed as dist


def group_on_store(store: dist.Store, rank: int, world_size: int, group_name: str, backend: str,
                   timeout: timedelta) -> dist.ProcessGroup:
    """The backend's group over `store`; blocks until all ranks are in. Public because every
    rank must build the group this way: rank 0 here (`WeightBroadcaster.connect`), and any
    stand-in for a server rank (the tests' fake SGLang server) over a client of rank 0's store.

    torch has no public call for a group outside the default world with its own store, so this
    uses `_new_process_group_helper`, the constructor `init_process_group` itself uses; the
    rank map is registered so the ordinary collectives accept the group.
    """
    from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world

    group, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), PrefixStore(group_name, store),
                                         group_name=group_name, timeout=timeout)
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def rank0_address(*, remote: bool, env: Mapping[str, str] | None = None) -> str:
    """The address of this host (the trainer's rank 0) that inference servers connect to.

    It is the training job's own rendezvous address: MASTER_ADDR, or under srun without it the
    first host of the job's node list (`parallel.dist.launch_from_env`). Rank 0 hosts the default
    group's store there, so it is this host by construction, under a name every node of the job
    already resolves and reaches (in a `mgrpo launch` job: the first training node, as Slurm
    names it). `socket.getfqdn()`, what the host calls itself, may resolve only locally or to an
    interface other nodes cannot reach, so it is only the fallback for servers on other hosts
    when the job rendezvoused on the loopback (a lone `mgrpo train` process).
    """
    from megatron_mgrpo.parallel.dist import launch_from_env

    address = launch_from_env(os.environ if env is None else env).master_addr
    if remote and address in ("127.0.0.1", "localhost", "::1"):
        return socket.getfqdn()
    return address


class WeightBroadcaster:
    """Rank 0 of a weight-update group: sends tensors to every server rank, in order.

    `master_port` 0 listens on any free port, picked anew each time the group is formed: ports
    chosen up front could collide between the pools of one trainer, and a group formed again
    after a server restart must not wait for the old store's port to be released. A group formed
    again is also named anew (`<group_name>.<n>`, see `close`).
    """

    def __init__(self, master_address: str, master_port: int, world_size: int, *, group_name: str = "mgrpo_weights",
                 backend: str = "nccl", device: str | torch.device = "cuda", timeout_s: float = 600.0):
        if world_size < 2:
            raise ValueError(f"world_size={world_size} must count the trainer and at least one server rank")
        self.master_address = master_address
        self.master_port = master_port
        self.world_size = world_size
        self.group_name = group_name
        self._base_name = group_name
        self._closed = 0
        self.backend = backend
        self.device = torch.device(device)
        self.timeout_s = timeout_s
        self.group: dist.ProcessGroup | None = None
        self._requested_port = master_port
        self._store: dist.TCPStore | None = None

    def listen(self) -> None:
        """Open rank 0's store, so that `master_port` (the one picked, if it was 0) can be sent to
        the servers before `connect()` waits for them."""
        if self._store is None:
            self._store = dist.TCPStore(self.master_address, self._requested_port, self.world_size, is_master=True,
                                        timeout=timedelta(seconds=self.timeout_s), wait_for_workers=False)
            self.master_port = self._store.port

    def connect(self) -> None:
        """Form the group; call while the servers are being asked to join (it blocks until they do)."""
        self.listen()
        self.group = group_on_store(self._store, 0, self.world_size, self.group_name, self.backend,
                                    timedelta(seconds=self.timeout_s))

    def broadcast(self, tensors: Iterable[torch.Tensor]) -> None:
        """Send each tensor to all server ranks, in the order the update request named them."""
        if self.group is None:
            raise RuntimeError(f"weight group {self.group_name!r} is not connected: call connect() first")
        for tensor in tensors:
            dist.broadcast(tensor.detach().to(self.device).contiguous(), src=0, group=self.group)

    def close(self) -> None:
        """Leave the group and stop listening; the next `connect()` forms a new one, under a new
        name: servers that were in this one still hold it by its name, and torch (so SGLang)
        refuses to create a second group by a name it has. Closing again does nothing."""
        if self._store is None:
            return
        if self.group is not None:
            dist.destroy_process_group(self.group)
            self.group = None
        self._store = None
        self.master_port = self._requested_port
        self._closed += 1
        self.group_name = f"{self._base_name}.{self._closed}"


def trainer_broadcaster(group_name: str, server_ranks: int, *, remote: bool) -> WeightBroadcaster:
    """The trainer's end of one pool's group: rank 0 at `rank0_address`, any free port, the
    `server_ranks` GPUs of all the pool's servers as ranks 1..server_ranks; NCCL from this
    process's GPU, gloo on CPU.

    `group_name` must differ between the pools: rank 0 holds all their groups in one process.
    """
    if torch.cuda.is_available():
        # this rank's device by index (init_distributed has set it), not whichever is current when sending
        backend, device = "nccl", torch.device("cuda", torch.cuda.current_device())
    else:
        backend, device = "gloo", torch.device("cpu")
    return WeightBroadcaster(rank0_address(remote=remote), 0, 1 + server_ranks, group_name=group_name, backend=backend,
                             device=device)
