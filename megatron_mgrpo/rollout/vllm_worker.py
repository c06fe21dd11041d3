"""Code that runs inside vLLM's worker processes (passed as `--worker-extension-cls`).

It is imported by the vLLM server's own Python, which may live in another environment: it
needs only torch and safetensors, never the rest of megatron_mgrpo.

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
        from safetensors.torch import load_file

        tensors = load_file(path, device=str(self.device) if hasattr(self, "device") else "cpu")
        self.model_runner.reload_weights(weights_iterator=iter(tensors.items()), is_checkpoint_format=True)
        return json.dumps({"tensors": len(tensors)})
