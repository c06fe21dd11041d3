import pytest
import torch

from megatron_mgrpo.sync.buckets import CorruptBucketError, bucketize, tensor_checksum, unbucketize


def named():
    torch.manual_seed(0)
    return [("a", torch.randn(10, 10)), ("b", torch.randn(3)), ("c", torch.randn(50, 10).bfloat16()),
            ("d", torch.randn(2, 2)), ("e", torch.tensor(1.5))]


def test_buckets_respect_the_byte_budget_and_round_trip():
    buckets = list(bucketize(named(), version=3, bucket_bytes=450))
    assert [b.names for b in buckets] == [["a", "b"], ["c"], ["d", "e"]]  # 400 + 12 B; c (1000 B) travels alone
    assert all(b.nbytes <= 450 or len(b.names) == 1 for b in buckets)
    restored = list(unbucketize(buckets, version=3))
    assert [n for n, _ in restored] == [n for n, _ in named()]
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(restored, named()))


def test_corruption_and_stale_versions_are_detected():
    bucket = next(bucketize(named(), version=1))
    bucket.tensors[2].view(torch.int16)[7] ^= 1  # one flipped bit in a bf16 tensor
    with pytest.raises(CorruptBucketError, match="tensor 'c' in bucket 0"):
        list(unbucketize([bucket], version=1))
    with pytest.raises(CorruptBucketError, match="version 1, expected 2"):
        list(unbucketize(bucketize(named(), version=1), version=2))


def test_checksum_sees_dtype_bytes():
    t = torch.randn(4)
    assert tensor_checksum(t) == tensor_checksum(t.clone()) != tensor_checksum(t + 1e-7)
    assert tensor_checksum(torch.randn(3).to(torch.float8_e4m3fn))


def test_pushes_without_checksums_skip_verification():
    bucket = next(bucketize(named(), version=1, checksums=False))
    assert bucket.checksums is None
    assert [n for n, _ in unbucketize([bucket], version=1)] == ["a", "b", "c", "d", "e"]
