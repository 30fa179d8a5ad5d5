"""The `moec` command: a thin layer over the moec API.

Heavy imports (torch, transformers) happen inside the commands that need them, so the
runtime commands (run, inspect) start quickly and never load PyTorch.
"""

from __future__ import annotations

import argparse
import json
import sys

import moec
from moec.errors import MoecError


def _compile(args) -> None:
    from moec.pipeline import compile as compile_model

    record = compile_model(args.model_dir, args.out, force=args.force, target=args.target,
                           progress=not args.quiet)
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        size = record["bytes"]["total"] / 2**20
        diff = record["verification"]["max_abs_logit_diff"]
        print(f"wrote {args.out}: {size:.1f} MiB, {len(record['moe_layers'])} MoE layers, "
              f"max logit diff vs transformers {diff:.2e}")


def _run(args) -> None:
    from moec.runtime import Artifact, Tokenizer, generate, stream_text

    artifact = Artifact(args.artifact, threads=args.threads)
    tokenizer = Tokenizer(args.artifact)
    prompt = tokenizer.encode(args.prompt)
    if not prompt:
        raise MoecError("the prompt encodes to no tokens")
    tokens = (int(step[0]) for step in generate(artifact, [prompt], args.max_new_tokens))
    if args.json:
        ids = list(tokens)
        print(json.dumps({"prompt_ids": prompt, "generated_ids": ids, "text": tokenizer.decode(ids)}))
        return
    sys.stdout.write(args.prompt)
    stream_text(tokenizer, tokens, lambda text: (sys.stdout.write(text), sys.stdout.flush()))
    sys.stdout.write("\n")


def _inspect(args) -> None:
    from moec.inspect import describe, summary

    info = describe(args.artifact)
    print(json.dumps(info, indent=2) if args.json else summary(info))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moec", description="Compress Mixture-of-Experts LLMs and compile them to ONNX.")
    parser.add_argument("--version", action="version", version=f"moec {moec.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("compile", help="compile a Hugging Face MoE checkpoint to an ONNX artifact",
                            description="Trace MODEL_DIR (a local Hugging Face folder with safetensors "
                                        "weights) to ONNX and write an artifact folder for onnxruntime.")
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.add_argument("--out", required=True, metavar="DIR", help="artifact folder to write")
    p.add_argument("--target", default="cpu", help="execution target (default: cpu)")
    p.add_argument("--force", action="store_true", help="replace DIR if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the build record as JSON")
    p.set_defaults(func=_compile)

    p = commands.add_parser("run", help="generate text with an artifact (greedy, streaming)",
                            description="Greedy generation with the KV cache in onnxruntime.")
    p.add_argument("artifact", metavar="DIR")
    p.add_argument("--prompt", required=True, metavar="TEXT")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="onnxruntime intra-op threads")
    p.add_argument("--json", action="store_true", help="print prompt/generated ids and text as JSON")
    p.set_defaults(func=_run)

    p = commands.add_parser("inspect", help="summarise an artifact",
                            description="Architecture, layers, experts and sizes of an artifact.")
    p.add_argument("artifact", metavar="DIR")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except MoecError as e:
        print(f"moec: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moec: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
