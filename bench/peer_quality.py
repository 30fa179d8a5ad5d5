"""Each peer's quants scored on one set of tokens: mainline llama.cpp's F16 logits as the base, every
GGUF's perplexity rise and KL divergence from them, as `llama-perplexity --kl-divergence` reports.

Why: ik_llama.cpp runs mainline's GGUFs, but its own tokenization or graph may differ. Fed mainline's
tokens and logits, a peer's F16 that computes the model as mainline does is ~0 nats from the base. A peer
far from it computes another model, and its rises say nothing. The first row says which.

    python bench/peer_quality.py F16.gguf --data held-out.txt --llama-tools LLAMA/bin \
        [--ik-tools IK/bin [--ik-types IQ2_KS,IQ2_K,Q2_K,IQ3_K,Q3_K_S]] [--gguf X.gguf ...] [--chunks N]
        [--workdir DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import llamacpp  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("f16", type=Path, help="the model's F16 GGUF, converted by mainline")
    parser.add_argument("--data", type=Path, required=True, help="held-out text")
    parser.add_argument("--llama-tools", type=Path, required=True, help="mainline's build/bin")
    parser.add_argument("--ik-tools", type=Path, help="ik_llama.cpp's build/bin: its F16 and its own quants")
    parser.add_argument("--ik-types", default="IQ2_KS,IQ2_K,Q2_K,IQ3_K,Q3_K_S")
    parser.add_argument("--gguf", type=Path, nargs="*", default=[], help="more GGUFs, scored by mainline")
    parser.add_argument("--chunks", type=int, help="score the first N windows of 256 tokens (default: all)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/moec-peer-quality"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    base = llamacpp.kl_base(args.llama_tools, args.f16, args.data, args.workdir / "base.kld", args.chunks)
    rows = [("mainline", gguf, args.llama_tools) for gguf in args.gguf]
    if args.ik_tools:
        rows.insert(0, ("ik_llama.cpp", args.f16, args.ik_tools))
        rows += [("ik_llama.cpp", llamacpp.quantize_with(args.ik_tools, args.f16, kind,
                                                         args.workdir / f"ik-{kind}.gguf"), args.ik_tools)
                 for kind in args.ik_types.split(",")]
    print("| engine | GGUF | MiB | rise | mean KL (nats) | same top |\n|---|---|---|---|---|---|")
    for engine, gguf, tools in rows:
        score = llamacpp.kl_divergence(tools, gguf, base)
        print(f"| {engine} | {gguf.name} | {gguf.stat().st_size / 2**20:.2f} | {score['rise_pct']:+.2f}% | "
              f"{score['mean_kld']:.6f} | {score['same_top_pct']:.1f}% |", flush=True)


if __name__ == "__main__":
    main()
