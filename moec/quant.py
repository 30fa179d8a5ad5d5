"""Round-to-nearest asymmetric block quantization of a weight matrix [out, in].

Blocks of `group_size` run along the input dimension (the layout onnxruntime's MatMulNBits and
blocked DequantizeLinear use); a last partial block is allowed. Each block's scale and integer zero
point come from its grid rule (GRIDS): "minmax" spans the block's range widened to include zero, as
GPTQ and MC-MoE do; "weighted" searches clipped ranges for the least importance-weighted squared
error, importance being each input channel's second moment over the calibration tokens (what
llama.cpp's importance matrix weights its search by), uniform for weights without calibration
tokens. It pays as GPTQ's grid at every width; with RTN's 2-bit experts it lost more than minmax
(docs/measurements.md, "Expert quantizers"), hence the planner's default grid per method.
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
    grid: str = "minmax"

    def __call__(self, weight: np.ndarray) -> QuantizedWeight:
        return self.result if self.result is not None else rtn(weight, self.bits, self.group_size, self.grid)


GRIDS = ("minmax", "weighted")
# the weighted grid's candidates: the zero-widened range shrunk by each factor (clipping the block's
# outliers), each with its zero point moved by each offset; every candidate's scale is then refitted
SHRINKS = np.linspace(1.0, 0.5, 11)
ZERO_OFFSETS = (-1, 0, 1)


def rtn(weight: np.ndarray, bits: int, group_size: int = 128, grid: str = "minmax",
        importance: np.ndarray | None = None) -> QuantizedWeight:
    """`importance` [in] weighs the "weighted" grid's error per input channel (None: uniform)."""
    return QuantizedWeight(*quantize_rtn(weight, bits, group_size, grid, importance), bits=bits,
                           group_size=group_size)


def block_params(values: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of each block (last axis) for asymmetric `bits`-bit codes, the range
    widened to include zero."""
    low = np.minimum(values.min(-1), 0.0)
    high = np.maximum(values.max(-1), 0.0)
    qmax = 2**bits - 1
    scale = (high - low) / qmax
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return scale, np.clip(np.round(-low / scale), 0, qmax)


def weighted_block_params(values: np.ndarray, importance: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of each block (last axis) with the least sum of importance x squared
    error among minmax's and the SHRINKS x ZERO_OFFSETS candidates, each candidate's scale refitted by
    weighted least squares to its codes (so minmax's error is never exceeded). `importance`
    broadcasts against `values`."""
    qmax = 2**bits - 1
    base_scale, base_zero = block_params(values, bits)
    values = values.astype(np.float32)
    importance = np.broadcast_to(importance, values.shape).astype(np.float32)

    def centred_codes(scale, zero):  # codes minus the zero point
        return np.clip(np.round(values / scale[..., None]) + zero[..., None], 0, qmax) - zero[..., None]

    def error(scale, zero):
        return (importance * (values - centred_codes(scale, zero) * scale[..., None]) ** 2).sum(-1)

    best_error = error(base_scale, base_zero)
    best_scale, best_zero = base_scale.copy(), base_zero.copy()
    for shrink in SHRINKS:
        for offset in ZERO_OFFSETS:
            zero = np.clip(base_zero + offset, 0, qmax)
            q = centred_codes(base_scale * np.float32(shrink), zero)
            fitted = (importance * values * q).sum(-1) / np.maximum((importance * q * q).sum(-1), 1e-30)
            scale = np.where(fitted > 0, fitted, base_scale).astype(np.float32)
            candidate = error(scale, zero)
            better = candidate < best_error
            best_error = np.where(better, candidate, best_error)
            best_scale, best_zero = np.where(better, scale, best_scale), np.where(better, zero, best_zero)
    return best_scale, best_zero


def grid_params(values: np.ndarray, bits: int, grid: str, importance: np.ndarray | None = None):
    """A block's (scale, zero point) by `grid` (one of GRIDS)."""
    if grid == "minmax":
        return block_params(values, bits)
    return weighted_block_params(values, np.ones(values.shape[-1], np.float32) if importance is None else importance,
                                 bits)


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


def quantize_rtn(weight: np.ndarray, bits: int, group_size: int = 128, grid: str = "minmax",
                 importance: np.ndarray | None = None):
    """(codes uint8 [out, in], scales float32 [out, blocks], zero points uint8 [out, blocks])."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")
    out_features, in_features = weight.shape
    blocks = -(-in_features // group_size)
    weights = np.zeros(blocks * group_size, np.float32)  # the padding's error does not count
    weights[:in_features] = 1.0 if importance is None else importance
    weights = weights.reshape(blocks, group_size)
    codes = np.empty((out_features, in_features), np.uint8)
    scales = np.empty((out_features, blocks), np.float32)
    zeros = np.empty((out_features, blocks), np.uint8)

    def rows(start: int, stop: int) -> None:
        padded = np.zeros((stop - start, blocks * group_size), np.float32)
        padded[:, :in_features] = weight[start:stop]
        grouped = padded.reshape(stop - start, blocks, group_size)  # zero padding: ranges include 0 anyway
        scale, zero = grid_params(grouped, bits, grid, weights)
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
