"""Round-to-nearest asymmetric block quantization of a weight matrix [out, in].

Blocks of `group_size` run along the input dimension (the layout onnxruntime's MatMulNBits and
blocked DequantizeLinear use); a last partial block is allowed. The range of each block is
widened to include zero, as GPTQ and MC-MoE do, so zero stays exactly representable.
"""

from __future__ import annotations

import numpy as np


def quantize_rtn(weight: np.ndarray, bits: int, group_size: int = 128):
    """(codes uint8 [out, in], scales float32 [out, blocks], zero points uint8 [out, blocks])."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")
    out_features, in_features = weight.shape
    blocks = -(-in_features // group_size)
    padded = np.zeros((out_features, blocks * group_size), np.float32)
    padded[:, :in_features] = weight
    grouped = padded.reshape(out_features, blocks, group_size)  # zero padding: ranges include 0 anyway
    low = np.minimum(grouped.min(-1), 0.0)
    high = np.maximum(grouped.max(-1), 0.0)
    qmax = 2**bits - 1
    scale = (high - low) / qmax
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    zero = np.clip(np.round(-low / scale), 0, qmax)
    codes = np.clip(np.round(grouped / scale[..., None]) + zero[..., None], 0, qmax)
    codes = codes.reshape(out_features, -1)[:, :in_features]
    return codes.astype(np.uint8), scale, zero.astype(np.uint8)


def dequantize(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, group_size: int = 128) -> np.ndarray:
    in_features = codes.shape[1]
    expand = lambda a: np.repeat(a.astype(np.float32), group_size, axis=1)[:, :in_features]  # noqa: E731
    return ((codes.astype(np.float32) - expand(zero)) * expand(scale)).astype(np.float32)


def fake_quantize(weight: np.ndarray, bits: int, group_size: int = 128) -> np.ndarray:
    """The weight as the quantized artifact will compute with it."""
    return dequantize(*quantize_rtn(weight, bits, group_size), group_size=group_size)
