"""The weight-update group protocol with gloo: a fake server process joins and receives the tensors."""

import pytest
import torch
import torch.multiprocessing as mp

from megatron_mgrpo.rollout.weight_broadcast import WeightBroadcaster
from tests.unit.rollout.fake_sglang.weight_group import join_weight_group

GROUP = "mgrpo_weights_test"
#: spawned children import torch before they join: slow on a loaded machine, and only ever waited for
TIMEOUT_S = 300


def sent_tensors():
    generator = torch.Generator().manual_seed(0)
    return {"model.embed_tokens.weight": torch.randn(7, 5, generator=generator),
            "model.norm.weight": torch.randn(5, generator=generator).to(torch.bfloat16),
            "lm_head.bias": torch.arange(3, dtype=torch.int32)}


def fake_server_rank(rank, port, world_size, manifest, out_queue):
    """What a server rank does: join as rank `rank`, then receive the named tensors in order."""
    import torch.distributed as dist

    group = join_weight_group("127.0.0.1", port, rank, world_size, GROUP, "gloo", timeout_s=TIMEOUT_S)
    received = {}
    for name, dtype, shape in manifest:
        tensor = torch.empty(shape, dtype=getattr(torch, dtype))
        dist.broadcast(tensor, src=0, group=group)
        received[name] = tensor
    out_queue.put((rank, received))
    dist.destroy_process_group(group)


@pytest.mark.slow
def test_server_ranks_receive_exactly_what_rank0_broadcast():
    tensors = sent_tensors()
    manifest = [(name, str(t.dtype).removeprefix("torch."), list(t.shape)) for name, t in tensors.items()]
    world_size = 3
    # rank 0 listens on a port the OS picks and holds it from then on, as the trainer does: a port
    # found free and bound only later may be taken in between by another process of a busy machine
    broadcaster = WeightBroadcaster("127.0.0.1", 0, world_size, group_name=GROUP, backend="gloo", device="cpu",
                                    timeout_s=TIMEOUT_S)
    broadcaster.listen()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    servers = [ctx.Process(target=fake_server_rank,
                           args=(rank, broadcaster.master_port, world_size, manifest, queue)) for rank in (1, 2)]
    for process in servers:
        process.start()
    broadcaster.connect()
    broadcaster.broadcast(tensors.values())
    results = dict(queue.get(timeout=TIMEOUT_S) for _ in servers)
    broadcaster.close()
    for process in servers:
        process.join(timeout=30)
        assert process.exitcode == 0
    assert sorted(results) == [1, 2]
    for received in results.values():
        assert list(received) == list(tensors)
        for name, tensor in tensors.items():
            assert received[name].dtype == tensor.dtype and torch.equal(received[name], tensor)


def test_broadcast_before_connect_is_a_clear_error():
    broadcaster = WeightBroadcaster("127.0.0.1", 0, 2, backend="gloo", device="cpu")
    with pytest.raises(RuntimeError, match="call connect\\(\\) first"):
        broadcaster.broadcast([torch.zeros(1)])


def test_a_closed_group_is_formed_again_under_a_new_name():
    """Servers that were in the closed group still hold it by name, and torch refuses a second
    group by a name it has: the next group is named anew. Closing twice closes once."""
    broadcaster = WeightBroadcaster("127.0.0.1", 0, 2, group_name="mgrpo-policy", backend="gloo", device="cpu")
    broadcaster.close()  # nothing formed yet: nothing to rename
    assert broadcaster.group_name == "mgrpo-policy"
    broadcaster.listen()
    assert broadcaster.master_port > 0
    broadcaster.close()
    broadcaster.close()
    assert (broadcaster.group_name, broadcaster.master_port) == ("mgrpo-policy.1", 0)
