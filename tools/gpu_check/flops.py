"""FLOPs of a dense decoder's train step, for model FLOPs utilisation (MFU).

Counted per token of a sequence of length `seq_len`, multiply-add = 2 FLOPs, matmuls only
(norms, activations, softmax and the optimizer are a few percent and left out, as MFU usually
does). With h = hidden, a = heads, g = query groups (KV heads), d = head dim, f = MLP
intermediate size, V = (padded) vocabulary, L = layers, s = seq_len:

    forward = 2 * [L * (h*a*d + 2*h*g*d + a*d*h + 3*h*f) + h*V]      weights: q, k, v, o, SwiGLU, LM head
            + L * 4 * a * d * s_ctx                                  attention: QK^T and AV
    train   = 3 * forward                                            backward = 2x forward

s_ctx is the number of keys a query sees on average: (s + 1) / 2 for causal attention, s when the
kernel computes the full square (PaLM's 6N + 12 L H Q T counts s). The embedding lookup is no matmul.
"""

from __future__ import annotations

from typing import Any

#: Dense bf16 tensor-core peak (no sparsity, SXM parts), FLOP/s, by a substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362.05e12}


def train_flops_per_token(spec: Any, seq_len: int, causal: bool = True) -> float:
    """FLOPs of one train step (forward + backward) per token, for a dense `ModelSpec`-like `spec`."""
    if getattr(spec, "num_experts", 0):
        raise ValueError("train_flops_per_token counts dense models only; this spec has experts")
    h, a, g, d = spec.hidden_size, spec.num_heads, spec.num_query_groups, spec.head_dim
    per_layer = h * a * d + 2 * h * g * d + a * d * h + 3 * h * spec.ffn_hidden_size
    weights = 2 * (spec.num_layers * per_layer + h * spec.padded_vocab_size)
    keys = (seq_len + 1) / 2 if causal else seq_len
    attention = spec.num_layers * 4 * a * d * keys
    return 3 * (weights + attention)


def peak_bf16_flops(device_name: str) -> float | None:
    """The dense bf16 peak of a known GPU, or None (then no MFU is reported)."""
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in device_name), None)
