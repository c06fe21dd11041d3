"""The Megatron policy: vocab-parallel log-probs and entropy (train step, momentum shards and
checkpoints build on it).

Kept free of heavy imports so the CLI can catch `CheckpointError` without loading torch.
"""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, or a run none of whose checkpoints loads; the message names
    the checkpoints, the files where known, and what to do."""
