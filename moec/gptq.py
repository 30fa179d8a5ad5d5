"""GPTQ (Frantar et al., 2022), the error-compensating quantizer MC-MoE used for its experts.

Columns of W [N, K] are quantized left to right; each column's rounding error is spread onto the
columns not yet quantized through the inverse Hessian of the inputs (H = X^T X over the tokens
that actually reach this weight), so the product X W^T, not W itself, stays close. Every
`group_size` columns get their scale and zero point from the error-updated weights (the same
block layout and grid rules as RTN, so the result packs into MatMulNBits unchanged; the "weighted"
grid weighs each column by its Hessian diagonal).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from moec.planner.plan import plan_grid, plan_layer_prior
from moec.quant import QuantizedWeight, grid_params, rtn

DAMPING = 0.01  # of the mean Hessian diagonal, for a well-conditioned inverse


def gptq(weight: np.ndarray, hessian: np.ndarray, bits: int, group_size: int = 128,
         grid: str = "minmax") -> QuantizedWeight:
    w = torch.tensor(weight, dtype=torch.float64)
    h = torch.tensor(hessian, dtype=torch.float64)
    n, k = w.shape
    dead = torch.diag(h) == 0  # inputs never seen: any value is as good, zero is simplest
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += DAMPING * torch.mean(torch.diag(h)) * torch.eye(k, dtype=h.dtype)
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    importance = torch.diag(h).numpy()

    qmax = 2**bits - 1
    blocks = -(-k // group_size)
    codes = np.zeros((n, k), np.uint8)
    scales = np.zeros((n, blocks), np.float32)
    zeros = np.zeros((n, blocks), np.uint8)
    step = group_size * max(1, 128 // group_size)  # lazy-update block: whole groups
    for start in range(0, k, step):
        end = min(start + step, k)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        for i in range(end - start):
            column = start + i
            if column % group_size == 0:
                g = column // group_size
                scale, zero = grid_params(block[:, i:i + group_size].numpy()[:, None, :], bits, grid,
                                          importance[column:column + group_size])
                scales[:, g], zeros[:, g] = scale[:, 0], zero[:, 0]
                scale_t, zero_t = torch.tensor(scales[:, g], dtype=w.dtype), torch.tensor(zeros[:, g], dtype=w.dtype)
            q = torch.clamp(torch.round(block[:, i] / scale_t) + zero_t, 0, qmax)
            codes[:, column] = q.numpy().astype(np.uint8)
            error = (block[:, i] - (q - zero_t) * scale_t) / inverse[column, column]
            block[:, i:] -= error[:, None] * inverse[column, column:end][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ inverse[start:end, end:]
    return QuantizedWeight(codes, scales, zeros, bits=bits, group_size=group_size, method="gptq")


MIN_TOKENS = 32  # without a layer prior, experts routed fewer calibration tokens are quantized without them


def needs_calibration(plan: dict | None) -> bool:
    """Whether the plan's expert quantizer reads each expert's routed calibration tokens."""
    return plan is not None and (plan["quantization"]["method"] == "gptq" or plan_grid(plan) == "weighted")


def expert_quantizer(plan: dict, bits: int):
    """quantize(weight [N, K], gram [K, K]: the inputs' X^T X, float64 tensor) for the plan's method and
    grid: GPTQ with it as the Hessian, or RTN on the weighted grid with its diagonal (the inputs'
    second moments)."""
    group_size, grid = plan["quantization"]["group_size"], plan_grid(plan)
    if plan["quantization"]["method"] == "gptq":
        return lambda weight, gram: gptq(weight, gram.numpy(), bits, group_size, grid)
    return lambda weight, gram: rtn(weight, bits, group_size, grid, torch.diagonal(gram).numpy())


def _gram(inputs: torch.Tensor) -> torch.Tensor:
    return inputs.T @ inputs


def quantize_experts(checkpoint, plan: dict, windows: np.ndarray, progress: bool = True):
    """Quantize every routed expert the plan quantizes with the calibration tokens routed to it
    (gate/up: the layer's MoE inputs; down: the expert's own activations computed with its quantized
    gate and up), by moec.gptq.expert_quantizer. With a layer prior (plan_layer_prior), each expert's
    statistics also count the layer's, from all its tokens scaled to that many tokens (a shrinkage
    estimate: a rarely routed expert's few tokens are a poor sample of what reaches it). Returns
    ({weight name: QuantizedWeight}, {weight name: tokens}). Without a prior, experts with fewer than
    MIN_TOKENS tokens are left out, for the caller to quantize as weights without calibration are."""
    from moec.calibrate import moe_inputs
    from moec.experts import float32_views
    from moec.ops.moe import expert_hidden, expert_weight_name, expert_weights
    from moec.policy import weight_bits

    prior_tokens = plan_layer_prior(plan)
    quantized, tokens_seen = {}, {}
    for layer, module, calls, _ in moe_inputs(checkpoint, windows, desc="quantize", progress=progress):
        spec = layer.spec
        x = torch.from_numpy(np.concatenate([hidden for hidden, _, _ in calls])).double()
        prior = prior_tokens / len(x)  # each of the layer's tokens counts this much in an expert's statistics
        indices = np.concatenate([index for _, index, _ in calls])
        indices = np.where(np.concatenate([weight for _, _, weight in calls]) != 0, indices, -1)  # weight 0: no route
        stacked = float32_views(module)
        layer_gram = _gram(x) * prior if prior_tokens else None
        for e in range(len(plan["experts"]["bits"][layer.layer])):
            names = {p: expert_weight_name(layer.layer, e, p) for p in spec.projections}
            bits = {p: weight_bits(plan, name) for p, name in names.items()}  # down's may differ (down_bits)
            tokens = np.nonzero((indices == e).any(-1))[0]
            for name in names.values():
                tokens_seen[name] = int(tokens.size)
            if set(bits.values()) == {None} or (tokens.size < MIN_TOKENS and not prior_tokens):  # float, or too few
                continue
            xe = x[tokens]
            expert = expert_weights(stacked, e, spec)
            first = [p for p in spec.projections if p != "down" and bits[p] is not None]
            gram = _gram(xe) + layer_gram if prior_tokens else _gram(xe)
            for p in first:
                quantized[names[p]] = expert_quantizer(plan, bits[p])(getattr(expert, p), gram)
            dequantized = dataclasses.replace(expert, **{p: quantized[names[p]].dequantize() for p in first})
            if bits["down"] is None:
                continue

            def activations(inputs):
                return torch.from_numpy(expert_hidden(inputs.float().numpy(), dequantized, spec)).double()

            gram = _gram(activations(xe))
            if prior_tokens:
                gram += _gram(activations(x)) * prior
            quantized[names["down"]] = expert_quantizer(plan, bits["down"])(expert.down, gram)
        module = calls = x = None
    return quantized, tokens_seen


def calibrated_experts(checkpoint, plan: dict, data, samples: int, seq_len: int, progress: bool):
    """The routed experts quantized with their calibration tokens (and each one's token count), for
    a plan that needs_calibration."""
    from moec.runtime import Tokenizer
    from moec.text import read_text, token_windows

    text, _ = read_text(data)
    windows = token_windows(Tokenizer(checkpoint.path).encode(text), samples, seq_len)
    return quantize_experts(checkpoint, plan, windows, progress=progress)
