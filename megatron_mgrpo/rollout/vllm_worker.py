"""Code that runs inside vLLM's worker processes (passed as `--worker-extension-cls`).

It is imported by the vLLM server's own Python, which may live in another environment: it
needs only torch, safetensors and xxhash (and `megatron_mgrpo.sync.buckets`, which needs no
more), never the rest of megatron_mgrpo.

Weights arrive as a safetensors file of HF-named tensors (on the same host: in /dev/shm, so
it is a memory copy) and go through the model's own `load_weights`, which knows vLLM's fused
QKV and gate/up layouts: we never re-implement vLLM's parameter naming. The load goes through
vLLM's layerwise in-place reload, not a bare `load_weights`: backends repack weights after
loading (the CPU backend replaces each linear weight by a oneDNN-packed copy and empties the
original), and only the reload path restores the original parameters and repacks afterwards. A
bare `load_weights` fails halfway there, leaving a model that is neither the old nor the new one.
"""

import json


class WeightSyncExtension:
    """Methods added to each vLLM worker; reached over the server's `/collective_rpc`."""

    def mgrpo_load_weights(self, path: str) -> str:
        """Load the weights file at `path` after checking every tensor against the checksum the
        trainer wrote into its metadata (the check runs on the bytes as read, on the CPU)."""
        from safetensors import safe_open

        from megatron_mgrpo.sync.buckets import verify_checksums

        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        expected = json.loads(metadata.get("mgrpo_xxh3", "null"))
        if expected is None or expected.keys() != tensors.keys():
            raise ValueError(f"weights file {path} lists checksums for {sorted(expected or {})[:5]}... but holds "
                             f"{sorted(tensors)[:5]}...: not a complete push from the trainer")
        names = list(tensors)
        verify_checksums(names, [tensors[n] for n in names], [expected[n] for n in names],
                         f"weights file {path} (version {metadata.get('mgrpo_weights_version')})")
        self.model_runner.reload_weights(weights_iterator=iter(tensors.items()), is_checkpoint_format=True)
        return json.dumps({"tensors": len(tensors)})
