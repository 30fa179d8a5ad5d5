"""Rarely routed experts, quantized with and without a layer prior: each expert's output error on
held-out tokens routed to it, for the experts with the fewest calibration tokens.

A plan's experts are quantized (GPTQ or RTN on the weighted grid: the quantizers that read each
expert's routed calibration tokens) once per `--priors` value (plan.json's
quantization.layer_prior_tokens: each expert's input statistics shrunk toward the layer's, all its
tokens counted as that many). Each expert's error is ||f_q(x) - f(x)||^2 / ||f(x)||^2 over the
held-out tokens routed to it (f: the expert's feed-forward, f_q with the dequantized weights).
Printed: the `--rarest` experts by calibration tokens, and the mean over all experts, one column
per prior.

    python bench/rare_experts.py CHECKPOINT PLAN.json --heldout FILE.txt [--data FILE.txt]
        [--samples 16] [--heldout-samples 16] [--seq-len 256] [--priors 0,64,256] [--rarest 8] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np


def windows(checkpoint, data, samples: int, seq_len: int) -> np.ndarray:
    from moec.runtime import Tokenizer
    from moec.text import read_text, token_windows

    return token_windows(Tokenizer(checkpoint.path).encode(read_text(data)[0]), samples, seq_len)


def expert_errors(checkpoint, quantized: dict[int, dict], heldout: np.ndarray) -> dict[int, dict]:
    """{prior: {(layer, expert): relative squared output error on its held-out tokens}}."""
    from moec.calibrate import moe_inputs
    from moec.experts import float32_views
    from moec.ops.moe import expert_ffn, expert_weight_name, expert_weights

    errors = {prior: {} for prior in quantized}
    for layer, module, calls, _ in moe_inputs(checkpoint, heldout, desc="held-out", progress=True):
        x = np.concatenate([hidden for hidden, _, _ in calls])
        indices = np.concatenate([index for _, index, _ in calls])
        stacked = float32_views(module)
        for e in range(int(indices.max()) + 1):
            tokens = np.nonzero((indices == e).any(-1))[0]
            names = {p: expert_weight_name(layer.layer, e, p) for p in layer.spec.projections}
            expert = expert_weights(stacked, e, layer.spec)
            if tokens.size == 0 or names["up"] not in quantized[next(iter(quantized))]:
                continue
            want = expert_ffn(x[tokens], expert, layer.spec)
            for prior, weights in quantized.items():
                dequantized = dataclasses.replace(expert, **{p: weights[n].dequantize() for p, n in names.items()})
                got = expert_ffn(x[tokens], dequantized, layer.spec)
                errors[prior][layer.layer, e] = float(((got - want) ** 2).sum() / (want ** 2).sum())
    return errors


def main() -> None:
    from moec.checkpoint import open_checkpoint
    from moec.gptq import quantize_experts
    from moec.text import DEFAULT_CORPUS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("plan", type=Path, help="a plan.json whose method is gptq or whose grid is weighted")
    parser.add_argument("--heldout", required=True, help="text the errors are measured on")
    parser.add_argument("--data", default=DEFAULT_CORPUS, help="calibration text (default: the built-in corpus)")
    parser.add_argument("--samples", type=int, default=16, help="calibration windows (default 16)")
    parser.add_argument("--heldout-samples", type=int, default=16, help="held-out windows (default 16)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--priors", default="0,64,256", help="layer_prior_tokens values (default 0,64,256)")
    parser.add_argument("--rarest", type=int, default=8, help="experts listed (default 8)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    checkpoint = open_checkpoint(args.checkpoint)
    plan = json.loads(args.plan.read_text())
    calibration = windows(checkpoint, args.data, args.samples, args.seq_len)
    quantized, seen = {}, {}
    for prior in map(int, args.priors.split(",")):
        prior_plan = {**plan, "quantization": {**plan["quantization"], "layer_prior_tokens": prior}}
        quantized[prior], seen = quantize_experts(checkpoint, prior_plan, calibration, progress=True)
    errors = expert_errors(checkpoint, quantized, windows(checkpoint, args.heldout, args.heldout_samples,
                                                          args.seq_len))
    priors = list(quantized)
    measured = [key for key in errors[priors[0]] if all(key in errors[p] for p in priors)]
    tokens = {key: seen[f"layers.{key[0]}.experts.{key[1]}.up_proj"] for key in measured}
    rows = [{"layer": layer, "expert": e, "calibration_tokens": tokens[layer, e],
             "errors": {str(p): errors[p][layer, e] for p in priors}}
            for layer, e in sorted(measured, key=lambda key: tokens[key])[:args.rarest]]
    means = {str(p): float(np.mean([errors[p][key] for key in measured])) for p in priors}
    if args.json:
        print(json.dumps({"rarest": rows, "mean": means, "experts": len(measured)}))
        return
    print("| layer | expert | calibration tokens | " + " | ".join(f"prior {p}" for p in priors) + " |")
    print("|---|---|---|" + "---|" * len(priors))
    for row in rows:
        print(f"| {row['layer']} | {row['expert']} | {row['calibration_tokens']} | "
              + " | ".join(f"{row['errors'][str(p)]:.4f}" for p in priors) + " |")
    print(f"| mean of {len(measured)} | | | " + " | ".join(f"{means[str(p)]:.4f}" for p in priors) + " |")


if __name__ == "__main__":
    main()
