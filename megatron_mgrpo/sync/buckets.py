"""Byte-sized buckets of named tensors with a weights version and per-tensor checksums.

Pushing weights tensor by tensor costs a round trip each (hundreds for an MoE model); one huge
blob needs the whole model twice in memory. Buckets of ~512 MB bound both. Each tensor carries
an xxh3 checksum that the receiving side recomputes, so a bucket damaged in transit (or a
mis-sized send) is an error naming the tensor, never a silently wrong model. Hashing runs on
all cores (xxhash releases the GIL); a push that crosses no transport (an in-process engine
reading the trainer's own memory) may skip checksums, which halves its cost.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import xxhash

DEFAULT_BUCKET_BYTES = 512 << 20
_hashers = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="bucket-checksum")


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
    checksums: list[str] | None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)


def tensor_checksums(tensors: list[torch.Tensor]) -> list[str]:
    """`tensor_checksum` of each tensor, hashed in parallel."""
    return list(_hashers.map(tensor_checksum, tensors))


def verify_checksums(names: list[str], tensors: list[torch.Tensor], expected: list[str], where: str) -> None:
    """Raise `CorruptBucketError` naming the first tensor whose bytes do not hash to `expected`."""
    for name, want, actual in zip(names, expected, tensor_checksums(tensors)):
        if actual != want:
            raise CorruptBucketError(f"tensor {name!r} in {where} does not match its checksum: the push was "
                                     f"corrupted; resend the weights")


def bucketize(named_tensors: Iterable[tuple[str, torch.Tensor]], version: int,
              bucket_bytes: int = DEFAULT_BUCKET_BYTES, checksums: bool = True) -> Iterator[Bucket]:
    """Group tensors into buckets of at most `bucket_bytes` (a larger tensor travels alone)."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes={bucket_bytes} must be >= 1")

    def bucket(index, names, tensors):
        return Bucket(version, index, names, tensors, tensor_checksums(tensors) if checksums else None)

    index, names, tensors, size = 0, [], [], 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if tensors and size + nbytes > bucket_bytes:
            yield bucket(index, names, tensors)
            index, names, tensors, size = index + 1, [], [], 0
        names.append(name)
        tensors.append(tensor)
        size += nbytes
    if tensors:
        yield bucket(index, names, tensors)


def unbucketize(buckets: Iterable[Bucket], version: int) -> Iterator[tuple[str, torch.Tensor]]:
    """The named tensors of `buckets`, checked against the expected version and their checksums."""
    for bucket in buckets:
        if bucket.version != version:
            raise CorruptBucketError(f"bucket {bucket.index} carries weights version {bucket.version}, "
                                     f"expected {version}: a stale or mixed-up push")
        if bucket.checksums is not None:
            verify_checksums(bucket.names, bucket.tensors, bucket.checksums,
                             f"bucket {bucket.index} (version {version})")
        yield from zip(bucket.names, bucket.tensors)
