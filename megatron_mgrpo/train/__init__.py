"""The Megatron policy: vocab-parallel log-probs and entropy (train step, momentum shards and
checkpoints build on it)."""
