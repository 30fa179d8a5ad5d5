"""The CUDA target's checks on a machine with an NVIDIA GPU and onnxruntime-gpu.

On the Mixtral-proportioned random model of bench/compare.py, for a float artifact and artifacts
planned at 2.5, 4 and 8 average expert bits, each compiled with --target cuda (and --target cpu):
  - verification: compile runs the artifact on the first provider it has (CUDA here) against
    PyTorch with the same (dequantized) weights; the record's difference is reported;
  - node placement: one profiled forward; every node that ran on another provider than CUDA is listed;
  - greedy tokens of the CUDA artifact on the GPU against the CPU artifact on the CPU;
  - `moec bench` prefill / decode tokens per second, against transformers in PyTorch (fp16) on the
    same GPU when torch sees one.

    pip install -e ".[cuda]" && python bench/cuda.py [--workdir /tmp/moec-cuda] [--json]

Without a GPU it still runs, on the CPU provider, and says so: the placement then lists every node.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # the benchmark's model and helpers

BITS = (None, 2.5, 4, 8)


def node_placement(artifact: Path) -> dict:
    """Providers that ran the artifact's nodes in one profiled forward: {provider: {op_type: count}}."""
    import onnxruntime as ort

    from moec.runtime import available_providers, empty_past, read_record, session_options

    record = read_record(artifact)
    options = session_options(record)
    options.enable_profiling = True
    session = ort.InferenceSession(str(artifact / "model.onnx"), options,
                                   providers=available_providers(record["providers"]))
    prompt = np.arange(1, 17)[None]
    session.run(None, {"input_ids": prompt, "attention_mask": np.ones_like(prompt),
                       "position_ids": np.arange(16)[None]} | empty_past(session, 1))
    profile = Path(session.end_profiling())
    placed: dict = collections.defaultdict(collections.Counter)
    for event in json.loads(profile.read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            placed[event["args"].get("provider", "?")][event["args"].get("op_name", "?")] += 1
    profile.unlink()
    return {provider: dict(ops) for provider, ops in placed.items()}


def greedy(artifact: Path, prompt: list[int], tokens: int = 32) -> list[int]:
    from moec.runtime import Artifact, generate

    return [int(t[0]) for t in generate(Artifact(artifact), [prompt], tokens)]


def torch_fp16_speed(model_dir: Path, args) -> dict | None:
    """transformers fp16 on the GPU, as bench/compare.py times it; None where torch sees no GPU."""
    import torch

    return compare.transformers_speed(model_dir, "float16", args, device="cuda") if torch.cuda.is_available() \
        else None


def main() -> None:
    import onnxruntime as ort

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/moec-cuda", type=Path)
    parser.add_argument("--prompt-len", default=128, type=int)
    parser.add_argument("--gen-len", default=64, type=int)
    parser.add_argument("--repeats", default=3, type=int)
    parser.add_argument("--threads", default=2, type=int, help="PyTorch's CPU threads")
    parser.add_argument("--samples", default=16, type=int)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    model_dir = args.workdir / "checkpoint"
    if not (model_dir / "config.json").is_file():
        args.workdir.mkdir(parents=True, exist_ok=True)
        compare.build("mixtral", model_dir)
    stats = args.workdir / "stats.json"
    if not stats.is_file():
        compare.moec("calibrate", str(model_dir), "--samples", str(args.samples), "--out", str(stats), "--quiet")
    from moec.bench import bench

    rows, prompt = [], [int(t) for t in np.random.default_rng(1).integers(0, 2048, 16)]
    for bits in BITS:
        name = "float" if bits is None else f"{bits:g}-bit"
        plan = [] if bits is None else ["--plan", str(args.workdir / f"plan-{name}.json")]
        if bits is not None:
            compare.moec("plan", "--stats", str(stats), "--avg-bits", str(bits), "--no-top-widths", "--out", plan[1])
        built = {}
        for target in ("cuda", "cpu"):
            built[target] = args.workdir / f"{target}-{name}"
            start = time.perf_counter()
            compare.moec("compile", str(model_dir), *plan, "--target", target, "--out", str(built[target]),
                         "--force", "--quiet")
            print(f"{name} {target}: compiled in {time.perf_counter() - start:.0f} s", flush=True)
        record = json.loads((built["cuda"] / "moec.json").read_text())
        placement = node_placement(built["cuda"])
        rows.append({"artifact": name, "verification": record["verification"],
                     "not_on_cuda": {p: ops for p, ops in placement.items() if p != "CUDAExecutionProvider"},
                     "greedy_tokens_equal_cpu": greedy(built["cuda"], prompt) == greedy(built["cpu"], prompt),
                     "bench": bench(built["cuda"], prompt_len=args.prompt_len, gen_len=args.gen_len,
                                    repeats=args.repeats)})
    result = {"providers": ort.get_available_providers(), "artifacts": rows,
              "transformers_fp16": torch_fp16_speed(model_dir, args)}
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"onnxruntime providers: {', '.join(result['providers'])}")
    print("| artifact | logit diff (tolerance) | nodes not on CUDA | greedy = CPU | prefill tok/s | decode tok/s |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        verification, speed = row["verification"], row["bench"]
        off = sum(sum(ops.values()) for ops in row["not_on_cuda"].values())
        print(f"| {row['artifact']} | {verification['max_abs_logit_diff']:.2e} ({verification['tolerance']:.2e}) | "
              f"{off} | {row['greedy_tokens_equal_cpu']} | {speed['prefill_tok_s']:.0f} | {speed['decode_tok_s']:.1f} |")
    if result["transformers_fp16"]:
        fp16 = result["transformers_fp16"]
        print(f"| transformers fp16 | | | | {fp16['prefill_tok_s']:.0f} | {fp16['decode_tok_s']:.1f} |")
    for row in rows:
        if row["not_on_cuda"]:
            print(f"{row['artifact']}: not on CUDA: {json.dumps(row['not_on_cuda'])}")


if __name__ == "__main__":
    main()
