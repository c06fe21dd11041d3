"""Byte-sized buckets of named tensors with a weights version and per-tensor checksums.

Pushing weights tensor by tensor costs a round trip each (hundreds for an MoE model); one huge
blob needs the whole model twice in memory. Buckets of ~512 MB bound both. Each tensor carries
an xxh3 checksum that the receiving side recomputes, so a bucket damaged in transit (or a
mis-sized send) is an error naming the tensor, never a silently wrong model.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import xxhash

DEFAULT_BUCKET_BYTES = 512 << 20


class CorruptBucketError(RuntimeError):
    """A received tensor does not match the checksum computed by the sender."""


def tensor_checksum(tensor: torch.Tensor) -> str:
    """xxh3-64 of the tensor's bytes (any dtype, including bf16 and fp8)."""
    data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return xxhash.xxh3_64_hexdigest(memoryview(data))


@dataclass
class Bucket:
    version: int
    index: int
    names: list[str]
    tensors: list[torch.Tensor]
    checksums: list[str]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)


def bucketize(named_tensors: Iterable[tuple[str, torch.Tensor]], version: int,
              bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> Iterator[Bucket]:
    """Group tensors into buckets of at most `bucket_bytes` (a larger tensor travels alone)."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes={bucket_bytes} must be >= 1")
    index, names, tensors, size = 0, [], [], 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if tensors and size + nbytes > bucket_bytes:
            yield Bucket(version, index, names, tensors, [tensor_checksum(t) for t in tensors])
            index, names, tensors, size = index + 1, [], [], 0
        names.append(name)
        tensors.append(tensor)
        size += nbytes
    if tensors:
        yield Bucket(version, index, names, tensors, [tensor_checksum(t) for t in tensors])


def unbucketize(buckets: Iterable[Bucket], version: int) -> Iterator[tuple[str, torch.Tensor]]:
    """The named tensors of `buckets`, each verified against its checksum and the expected version."""
    for bucket in buckets:
        if bucket.version != version:
            raise CorruptBucketError(f"bucket {bucket.index} carries weights version {bucket.version}, "
                                     f"expected {version}: a stale or mixed-up push")
        for name, tensor, checksum in zip(bucket.names, bucket.tensors, bucket.checksums):
            if tensor_checksum(tensor) != checksum:
                raise CorruptBucketError(f"tensor {name!r} in bucket {bucket.index} (version {version}) does not "
                                         f"match its checksum: the push was corrupted; resend the weights")
            yield name, tensor
