"""FP8 (e4m3) rollout weights with 128 x 128 block scales.

This is the layout SGLang and vLLM load for block-quantized FP8 checkpoints (DeepSeek-V3 and
Qwen3-FP8 style): each quantized linear weight `W` [out, in] travels as `name` in float8_e4m3fn
plus `name_scale_inv` in float32 of shape [ceil(out / 128), ceil(in / 128)], with
W ~= fp8 * scale_inv block by block. Only the large matmul weights of the transformer layers are
quantized; embeddings, the output layer, norms and biases stay in high precision, as in those
checkpoints.

Error bound: with scale s = amax(block) / 448, e4m3 round-to-nearest keeps 3 mantissa bits, so
|W - dequant(quant(W))| <= max(|W| / 16, s / 1024): a relative 2^-4 for normal numbers and half
the subnormal spacing 2^-9 (times s) near zero.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch

BLOCK = 128
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
SCALE_SUFFIX = "_scale_inv"
QUANTIZED = re.compile(r"\.layers\.\d+\..*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|"
                       r"w1|w2|w3)\.weight$")

QUANTIZATION_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                       "weight_block_size": [BLOCK, BLOCK]}


def _blocks(shape: torch.Size) -> tuple[int, int]:
    return -(-shape[0] // BLOCK), -(-shape[1] // BLOCK)


def quantize_block_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] weight -> (float8_e4m3fn weight, float32 scale_inv [ceil(out/128), ceil(in/128)])."""
    if weight.dim() != 2:
        raise ValueError(f"block FP8 quantizes 2-D weights, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    br, bc = _blocks(weight.shape)
    padded = torch.zeros(br * BLOCK, bc * BLOCK, dtype=torch.float32, device=weight.device)
    padded[:rows, :cols] = weight
    tiles = padded.view(br, BLOCK, bc, BLOCK)
    amax = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale_inv = amax / FP8_MAX
    quantized = (tiles / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return quantized.view(br * BLOCK, bc * BLOCK)[:rows, :cols].contiguous(), scale_inv


def dequantize_block_fp8(quantized: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """Inverse of `quantize_block_fp8`, in float32."""
    rows, cols = quantized.shape
    if tuple(scale_inv.shape) != _blocks(quantized.shape):
        raise ValueError(f"scale_inv shape {tuple(scale_inv.shape)} does not match weight {rows}x{cols} "
                         f"in {BLOCK}x{BLOCK} blocks (expected {_blocks(quantized.shape)})")
    expanded = scale_inv.repeat_interleave(BLOCK, 0)[:rows].repeat_interleave(BLOCK, 1)[:, :cols]
    return quantized.float() * expanded


def to_fp8_rollout_weights(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream HF-named tensors, replacing each layer matmul weight by its FP8 weight + scale_inv."""
    for name, tensor in named_tensors:
        if QUANTIZED.search(name) and tensor.dim() == 2:
            quantized, scale_inv = quantize_block_fp8(tensor)
            yield name, quantized
            yield name + SCALE_SUFFIX, scale_inv
        else:
            yield name, tensor
