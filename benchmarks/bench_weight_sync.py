"""Weight sync cost: Megatron shards -> HF tensors -> checksummed buckets -> in-process engine.

A ~100M-parameter Qwen3-like model at TP=1 (one gloo process). Ours: `export_hf_weights` +
`bucketize` + `unbucketize` + `HFEngine.update_weights` (in-place copies), once as an
in-process push and once with the xxh3 checksums a push over a transport carries (hashed by
the sender, verified by the receiver). Baseline in the same run: a plain `copy_` of the same bytes into the same
engine tensors, i.e. the memcpy any sync must do at least once.
Run: python benchmarks/bench_weight_sync.py
"""

import os

import torch
from timing import median_seconds
from transformers import Qwen3Config, Qwen3ForCausalLM


class _Tokenizer:
    eos_token_id, pad_token_id = 0, 0


def main() -> None:
    from megatron_mgrpo.models.hf_config import model_spec_from_hf
    from megatron_mgrpo.models.provider import build_gpt_model
    from megatron_mgrpo.parallel.dist import destroy_distributed, init_distributed
    from megatron_mgrpo.parallel.ports import free_port
    from megatron_mgrpo.rollout.hf_engine import HFEngine
    from megatron_mgrpo.sync.buckets import bucketize, unbucketize
    from megatron_mgrpo.sync.export import export_hf_weights

    os.environ["MASTER_PORT"] = str(free_port())
    init_distributed(tp=1)
    try:
        config = Qwen3Config(vocab_size=16000, hidden_size=768, intermediate_size=3072, num_hidden_layers=8,
                             num_attention_heads=12, num_key_value_heads=4, head_dim=64, tie_word_embeddings=False)
        spec = model_spec_from_hf(config)
        model = build_gpt_model(spec)
        engine = HFEngine(Qwen3ForCausalLM(config), _Tokenizer())
        local = model.state_dict()
        params = sum(t.numel() for n, t in local.items() if not n.endswith("_extra_state"))
        targets = dict(engine.model.named_parameters())
        pairs = [(targets[name], tensor) for name, tensor in export_hf_weights(local, spec)]
        nbytes = sum(t.numel() * t.element_size() for _, t in pairs)

        def sync(checksums: bool):
            named = export_hf_weights(local, spec)
            buckets = bucketize(named, version=1, checksums=checksums)
            engine.update_weights(unbucketize(buckets, version=1), version=1)

        @torch.no_grad()
        def memcpy():
            for target, tensor in pairs:
                target.copy_(tensor)

        copy_s = median_seconds(memcpy, reps=5)
        plain_s = median_seconds(lambda: sync(checksums=False), reps=5)
        checked_s = median_seconds(lambda: sync(checksums=True), reps=5)
    finally:
        destroy_distributed()
    print(f"{params / 1e6:.0f}M parameters, {nbytes / 1e9:.2f} GB")
    print(f"plain copy_ of the same bytes: {copy_s * 1000:7.0f} ms  ({nbytes / copy_s / 1e9:.1f} GB/s)")
    print(f"export + buckets + load (in-process push, no transport): {plain_s * 1000:7.0f} ms")
    print(f"export + buckets + checksums + verify + load:          {checked_s * 1000:7.0f} ms")
    print(f"with checksums, sync time / memcpy time: {checked_s / copy_s:.2f}x")
    print(f"in-process push, sync time / memcpy time: {plain_s / copy_s:.2f}x")


if __name__ == "__main__":
    main()
