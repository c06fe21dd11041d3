"""Weight sync: Megatron shards -> HF-named tensors -> buckets -> rollout engines."""
