import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from megatron_mgrpo.sync.fp8 import (BLOCK, dequantize_block_fp8, quantize_block_fp8,
                                     to_fp8_rollout_weights)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 300), cols=st.integers(1, 300), scale=st.floats(1e-4, 1e3), seed=st.integers(0, 99))
def test_dequantization_error_is_within_the_e4m3_bound(rows, cols, scale, seed):
    torch.manual_seed(seed)
    weight = torch.randn(rows, cols) * scale
    weight[0, 0] = 0.0
    quantized, scale_inv = quantize_block_fp8(weight)
    assert quantized.dtype == torch.float8_e4m3fn and quantized.shape == weight.shape
    assert scale_inv.shape == (-(-rows // BLOCK), -(-cols // BLOCK))
    restored = dequantize_block_fp8(quantized, scale_inv)
    block_scale = scale_inv.repeat_interleave(BLOCK, 0)[:rows].repeat_interleave(BLOCK, 1)[:, :cols]
    bound = torch.maximum(weight.abs() / 16, block_scale / 1024)
    assert ((restored - weight).abs() <= bound * (1 + 1e-6)).all()
    assert restored[0, 0] == 0.0


def test_outliers_only_affect_their_own_block():
    weight = torch.randn(256, 256)
    weight[0, 0] = 1e6  # an outlier in block (0, 0) pushes its neighbours below e4m3's range
    quantized, scale_inv = quantize_block_fp8(weight)
    restored = dequantize_block_fp8(quantized, scale_inv)
    far = (restored[128:, 128:] - weight[128:, 128:]).abs().max()
    near = (restored[:128, :128] - weight[:128, :128]).abs().max()
    assert far <= weight[128:, 128:].abs().max() / 16 and near > 1.0


def test_stream_quantizes_only_layer_matmuls():
    tensors = {"model.embed_tokens.weight": torch.randn(10, 8),
               "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8),
               "model.layers.0.self_attn.q_proj.bias": torch.randn(8),
               "model.layers.0.mlp.experts.3.down_proj.weight": torch.randn(8, 16),
               "model.layers.0.input_layernorm.weight": torch.ones(8),
               "lm_head.weight": torch.randn(10, 8)}
    out = dict(to_fp8_rollout_weights(tensors.items()))
    fp8 = {n for n, t in out.items() if t.dtype == torch.float8_e4m3fn}
    assert fp8 == {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.experts.3.down_proj.weight"}
    assert set(out) == set(tensors) | {n + "_scale_inv" for n in fp8}
    assert torch.equal(out["lm_head.weight"], tensors["lm_head.weight"])


def test_mismatched_scales_are_rejected():
    quantized, scale_inv = quantize_block_fp8(torch.randn(130, 10))
    with pytest.raises(ValueError, match="does not match"):
        dequantize_block_fp8(quantized, scale_inv[:1])
    with pytest.raises(ValueError, match="2-D"):
        quantize_block_fp8(torch.randn(3))
