"""Block error of each quantization grid on the blocks a calibrated plan's expert quantizer sees:
minmax, moec's weighted grid, and HQQ's zero-point optimisation (Badri & Shaji 2023: the scale
fixed at minmax's, the zero point fitted by a half-quadratic solver under an lp error, p < 1), with
the zero point rounded to an integer (what MatMulNBits' and QMoE's uint8 zero points hold) and left
as a float. Each figure is the importance-weighted squared error summed over all blocks of a width,
relative to minmax's.

Why HQQ is not one of moec's grids: with the scale fixed and an integer zero point, a block decodes
to multiples of the scale, and minmax's window already holds every weight's nearest multiple, so
another integer zero point can only clip. A float zero point needs float zero-point tensors (2 and
4 bits only in onnxruntime's MatMulNBits; 0.25 more bits a weight at group 128).

    python bench/grid_error.py CHECKPOINT PLAN.json [--samples 16] [--seq-len 256] [--data FILE.txt] [--json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

HQQ_STEPS, HQQ_P, HQQ_BETA, HQQ_KAPPA = 20, 0.7, 10.0, 1.01


def hqq_zero(values: np.ndarray, importance: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """HQQ's zero point for each block [..., group] with minmax's scale: (scale, float zero point)."""
    from moec.quant import block_params

    scale, zero = block_params(values, bits)
    s, z = scale[..., None], zero[..., None].astype(np.float32)
    total = np.maximum(importance.sum(-1, keepdims=True), 1e-30)
    beta = HQQ_BETA
    for _ in range(HQQ_STEPS):
        codes = np.clip(np.round(values / s + z), 0, 2**bits - 1)
        error = values - (codes - z) * s
        size = np.abs(error)
        error = np.sign(error) * np.maximum(size - np.maximum(size, 1e-30) ** (HQQ_P - 1) / beta, 0)  # lp shrink
        z = (importance * (codes - (values - error) / s)).sum(-1, keepdims=True) / total
        beta *= HQQ_KAPPA
    return scale, z[..., 0]


def block_error(values, importance, bits, scale, zero) -> float:
    codes = np.clip(np.round(values / scale[..., None] + zero[..., None]), 0, 2**bits - 1)
    return float((importance * (values - (codes - zero[..., None]) * scale[..., None]) ** 2).sum())


def main() -> None:
    from unittest import mock

    import moec.gptq as gptq
    import moec.quant as quant
    from moec.checkpoint import open_checkpoint
    from moec.text import DEFAULT_CORPUS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("plan", type=Path, help="a calibrated plan whose experts GPTQ or the weighted grid quantize")
    parser.add_argument("--samples", type=int, default=16, help="calibration windows (default 16)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens a window (default 256)")
    parser.add_argument("--data", default=DEFAULT_CORPUS, help="calibration text (default: the built-in corpus)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    totals: dict[int, dict[str, float]] = {}
    grid_params = quant.grid_params

    def measured(values, bits, grid, importance=None):
        values = np.asarray(values, np.float32)
        weight = np.broadcast_to(np.ones(values.shape[-1], np.float32) if importance is None
                                 else np.asarray(importance, np.float32), values.shape)
        scale, zero = hqq_zero(values, weight, bits)
        row = totals.setdefault(bits, {})
        for name, params in (("minmax", quant.block_params(values, bits)),
                             ("weighted", quant.weighted_block_params(values, weight, bits)),
                             ("hqq, integer zero", (scale, np.clip(np.round(zero), 0, 2**bits - 1))),
                             ("hqq, float zero", (scale, zero))):
            row[name] = row.get(name, 0.0) + block_error(values, weight, bits, *params)
        return grid_params(values, bits, grid, importance)

    plan = json.loads(args.plan.read_text())
    with mock.patch.object(quant, "grid_params", measured), mock.patch.object(gptq, "grid_params", measured):
        gptq.calibrated_experts(open_checkpoint(args.checkpoint), plan, args.data, args.samples, args.seq_len,
                                progress=True)
    relative = {bits: {name: error / row["minmax"] for name, error in row.items()}
                for bits, row in sorted(totals.items())}
    if args.json:
        print(json.dumps(relative))
        return
    names = list(next(iter(relative.values())))
    print("| bits | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for bits, row in relative.items():
        print(f"| {bits} | " + " | ".join(f"{row[name]:.4f}" for name in names) + " |")


if __name__ == "__main__":
    main()
