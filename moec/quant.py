"""Round-to-nearest asymmetric block quantization of a weight matrix [out, in].

Blocks of `group_size` run along the input dimension (the layout onnxruntime's MatMulNBits and
blocked DequantizeLinear use); a last partial block is allowed. The range of each block is
widened to include zero, as GPTQ and MC-MoE do, so zero stays exactly representable.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight [N, K] as integer codes with per-block scales and zero points along K."""

    codes: np.ndarray   # uint8 [N, K]
    scales: np.ndarray  # float32 [N, blocks]
    zeros: np.ndarray   # uint8 [N, blocks]
    bits: int
    group_size: int
    method: str = "rtn"

    def dequantize(self) -> np.ndarray:
        return dequantize(self.codes, self.scales, self.zeros, self.group_size)


@dataclass(frozen=True, eq=False)
class Quantizer:
    """How one weight is to be quantized and stored, decided up front from the plan and the target
    (moec.policy.quantization_specs); called with the weight
    [N, K] only when its packed bytes are written. `result` is a quantization computed ahead
    (GPTQ's, which needs calibration data), returned as is."""

    bits: int
    group_size: int
    stored_bits: int  # the target kernel's container for `bits` (1-bit codes in 2-bit MatMulNBits on CPU)
    method: str = "rtn"
    result: QuantizedWeight | None = None

    def __call__(self, weight: np.ndarray) -> QuantizedWeight:
        return self.result if self.result is not None else rtn(weight, self.bits, self.group_size)


def rtn(weight: np.ndarray, bits: int, group_size: int = 128) -> QuantizedWeight:
    return QuantizedWeight(*quantize_rtn(weight, bits, group_size), bits=bits, group_size=group_size)


def block_params(values: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of each block (last axis) for asymmetric `bits`-bit codes, the range
    widened to include zero."""
    low = np.minimum(values.min(-1), 0.0)
    high = np.maximum(values.max(-1), 0.0)
    qmax = 2**bits - 1
    scale = (high - low) / qmax
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return scale, np.clip(np.round(-low / scale), 0, qmax)


class ComputedTogether:
    """Arrays made together by `compute()` (a dict) when the first is read and dropped once each was
    read: the writer reads a weight's initializers one after another, so no more than one weight's
    (or one QMoE group's) packed arrays are held at a time."""

    def __init__(self, compute):
        self._compute, self._arrays, self._unread = compute, None, set()

    def read(self, key) -> np.ndarray:
        if self._arrays is None:
            self._arrays = self._compute()
            self._unread = set(self._arrays)
        array = self._arrays[key]
        self._unread.discard(key)
        if not self._unread:
            self._arrays = None
        return array


ROWS_PER_TASK = 256  # output rows quantized together: a task's temporaries are a few MB


def by_row_blocks(rows: int, work) -> None:
    """Call work(start, stop) over blocks of ROWS_PER_TASK rows on a thread per core (NumPy
    releases the GIL): a Mixtral-8x7B expert projection quantizes about twice as fast on two
    cores, and no full-size temporary is ever made."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    starts = range(0, rows, ROWS_PER_TASK)
    if len(starts) == 1:
        work(0, rows)
        return
    with ThreadPoolExecutor(min(len(starts), os.cpu_count() or 1)) as pool:
        for done in [pool.submit(work, start, min(start + ROWS_PER_TASK, rows)) for start in starts]:
            done.result()


def quantize_rtn(weight: np.ndarray, bits: int, group_size: int = 128):
    """(codes uint8 [out, in], scales float32 [out, blocks], zero points uint8 [out, blocks])."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")
    out_features, in_features = weight.shape
    blocks = -(-in_features // group_size)
    codes = np.empty((out_features, in_features), np.uint8)
    scales = np.empty((out_features, blocks), np.float32)
    zeros = np.empty((out_features, blocks), np.uint8)

    def rows(start: int, stop: int) -> None:
        padded = np.zeros((stop - start, blocks * group_size), np.float32)
        padded[:, :in_features] = weight[start:stop]
        grouped = padded.reshape(stop - start, blocks, group_size)  # zero padding: ranges include 0 anyway
        scale, zero = block_params(grouped, bits)
        q = np.clip(np.round(grouped / scale[..., None]) + zero[..., None], 0, 2**bits - 1)
        codes[start:stop] = q.reshape(stop - start, -1)[:, :in_features]
        scales[start:stop], zeros[start:stop] = scale, zero

    by_row_blocks(out_features, rows)
    return codes, scales, zeros


def dequantize(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, group_size: int = 128) -> np.ndarray:
    out_features, in_features = codes.shape
    weight = np.empty((out_features, in_features), np.float32)

    def rows(start: int, stop: int) -> None:
        expand = lambda a: np.repeat(a[start:stop].astype(np.float32), group_size, axis=1)[:, :in_features]  # noqa: E731
        weight[start:stop] = (codes[start:stop].astype(np.float32) - expand(zero)) * expand(scale)

    by_row_blocks(out_features, rows)
    return weight


def fake_quantize(weight: np.ndarray, bits: int, group_size: int = 128) -> np.ndarray:
    """The weight as the quantized artifact will compute with it."""
    return dequantize(*quantize_rtn(weight, bits, group_size), group_size=group_size)


def pack_matmul_nbits(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, bits: int,
                      block_size: int):
    """onnxruntime MatMulNBits inputs (B, scales, zero_points) for codes [N, K] of `bits` bits.

    B is [N, blocks, block_size * bits / 8]: element k = block * block_size + j * (8 / bits) + i
    sits at bit i * bits of byte j, least significant first; zero points are packed the same way
    along the blocks, each row padded to a whole byte.
    """
    if bits not in (2, 4, 8):
        raise ValueError(f"MatMulNBits packs 2, 4 or 8 bits, not {bits}")
    n, k = codes.shape
    blocks = -(-k // block_size)
    padded = np.zeros((n, blocks * block_size), np.uint8)
    padded[:, :k] = codes
    return _pack_rows(padded, bits).reshape(n, blocks, -1), scales.astype(np.float32), _pack_rows(zeros, bits)


def _pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
    per_byte = 8 // bits
    rows, width = values.shape
    padded = np.zeros((rows, -(-width // per_byte) * per_byte), np.uint8)
    padded[:, :width] = values
    packed = np.zeros((rows, padded.shape[1] // per_byte), np.uint8)
    for i in range(per_byte):  # codes are < 2**bits, so the shifted fields never overlap
        packed |= padded[:, i::per_byte] << np.uint8(i * bits)
    return packed


def repack_rows(packed: np.ndarray, bits: int, new_bits: int, width: int) -> np.ndarray:
    """Packed codes [..., bytes] of `width` values a row at `bits`, packed again at `new_bits` (a wider
    container holds the same codes: verification runs 2-bit experts in 4-bit kernels)."""
    per_byte = 8 // bits
    rows = packed.reshape(-1, packed.shape[-1])
    values = np.zeros((rows.shape[0], rows.shape[1] * per_byte), np.uint8)
    for i in range(per_byte):
        values[:, i::per_byte] = (rows >> np.uint8(i * bits)) & np.uint8(2**bits - 1)
    repacked = _pack_rows(values[:, :width], new_bits)
    return repacked.reshape(*packed.shape[:-1], repacked.shape[-1])
