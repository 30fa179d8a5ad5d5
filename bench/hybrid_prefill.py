"""A long prefill of a linear-attention hybrid: the artifact against transformers, and the share of
the Scans (the linear-attention recurrences: over tokens, or over chunks of 32 for the gated delta
rule) in the artifact's time.

For a model folder and its artifact (bench/frontier.py's Kimi-Linear work folder has both): the
prefill of `--tokens` tokens (one sequence, a fixed random prompt) timed in onnxruntime
(moec.bench) and in transformers (fp32, the same threads), each the median of `--repeats`; then one
prefill run under onnxruntime's profiler, its main graph's node time summed by operator type, and
each linear-attention Scan run alone on inputs of the shapes it had there. What the Scans over
tokens take bounds what a chunked form of the recurrence could save.

    python bench/hybrid_prefill.py MODEL_DIR ARTIFACT [--tokens 512] [--threads 2] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import machine, machine_line, read_bandwidth  # noqa: E402


def transformers_prefill(model_dir: Path, prompt: np.ndarray, threads: int, repeats: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.from_numpy(prompt)
    times = []
    with torch.no_grad():
        for run in range(repeats + 1):
            start = time.perf_counter()
            model(input_ids=ids, use_cache=True, logits_to_keep=1)
            if run:
                times.append(time.perf_counter() - start)
    return prompt.shape[1] / statistics.median(times)


def operator_times(artifact: Path, prompt: np.ndarray, threads: int) -> tuple[dict[str, float], list[dict]]:
    """Seconds by operator type of the main graph's nodes in one profiled prefill (after a warm-up run),
    and the Scan nodes' profiler events. The profiler times every node inside a Scan's body too, each
    iteration, which inflates the Scans most: what they take unprofiled is scan_seconds'."""
    import onnxruntime as ort

    from moec.runtime import Artifact, session_options

    artifact_run = Artifact(artifact, threads=threads)
    options = session_options(artifact_run.record, threads)  # the artifact's own, profiled
    options.enable_profiling = True
    options.log_severity_level = 3
    artifact_run.session = ort.InferenceSession(str(artifact / "model.onnx"), options,
                                                providers=["CPUExecutionProvider"])
    for _ in range(2):
        artifact_run.forward(prompt, np.ones_like(prompt), np.arange(prompt.shape[1])[None],
                             artifact_run.empty_cache(1, capacity=prompt.shape[1]), logits_to_keep=1)
    trace = Path(artifact_run.session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    last_start = [e for e in events if e.get("name") == "model_run"][-1]["ts"]
    nodes = [e for e in events
             if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= last_start]
    scans = [e for e in nodes if e["args"]["op_name"] == "Scan"]  # in the main graph or an If's branch
    within = [(e["ts"], e["ts"] + e["dur"]) for e in nodes if e["args"]["op_name"] in ("Scan", "If")]
    totals = collections.Counter()
    for event in nodes:  # the main graph's nodes: not those run inside a Scan or an If
        if not any(start < event["ts"] and event["ts"] + event["dur"] <= end for start, end in within):
            totals[event["args"]["op_name"]] += event["dur"] / 1e6
    return dict(totals.most_common()), scans


def scan_seconds(artifact: Path, scans: list[dict], threads: int, repeats: int) -> float:
    """The Scan nodes' seconds in one prefill, unprofiled: each run alone (its inputs random, of the
    shapes the profiled prefill gave it), the median of `repeats`, summed."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    model = onnx.load(str(artifact / "model.onnx"))
    initializers = {i.name: i for i in model.graph.initializer}
    def named(graph):  # every node, those of subgraphs (the rule's If branches) too
        for node in graph.node:
            yield node.name, node
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    yield from named(attribute.g)

    by_name = dict(named(model.graph))
    rng = np.random.default_rng(0)
    total = 0.0
    for event in scans:
        node = by_name[event["name"].removesuffix("_kernel_time")]
        body = next(a.g for a in node.attribute if a.name == "body")
        made = {i.name for i in body.input} | {i.name for i in body.initializer}
        made |= {o for n in body.node for o in n.output}
        outer = sorted({x for n in body.node for x in n.input if x and x not in made})  # the body's outer values
        names = [x for x in node.input if x]
        shapes = dict(zip(names, (next(iter(t.values())) for t in event["args"]["input_type_shape"])))
        feeds = [x for x in names if x not in initializers]
        graph = helper.make_graph(
            [node], "scan", [helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, shapes[x]) for x in feeds],
            [helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, None) for x in node.output],
            [initializers[x] for x in {*names, *outer} if x in initializers])
        alone = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(alone.SerializeToString(), options, providers=["CPUExecutionProvider"])
        inputs = {x: rng.normal(size=shapes[x]).astype(np.float32) * 0.1 for x in feeds}
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            session.run(None, inputs)
            times.append(time.perf_counter() - start)
        total += statistics.median(times[1:])
    return total


def main() -> None:
    from moec.bench import bench

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    vocab = json.loads((args.artifact / "config.json").read_text())["vocab_size"]
    prompt = np.random.default_rng(0).integers(0, vocab, (1, args.tokens), dtype=np.int64)  # bench's prompt
    moec = bench(args.artifact, prompt_len=args.tokens, gen_len=1, threads=args.threads, repeats=args.repeats)
    torch_tok_s = transformers_prefill(args.model_dir, prompt, args.threads, args.repeats)
    ops, scans = operator_times(args.artifact, prompt, args.threads)
    scan = scan_seconds(args.artifact, scans, args.threads, args.repeats)
    prefill = args.tokens / moec["prefill_tok_s"]
    result = {"machine": machine(argparse.Namespace(bandwidth=read_bandwidth(args.threads), threads=args.threads)),
              "tokens": args.tokens, "moec_prefill_tok_s": moec["prefill_tok_s"],
              "transformers_prefill_tok_s": torch_tok_s, "profiled_operator_seconds": ops,
              "scans": len(scans), "scan_seconds": scan, "scan_share": scan / prefill}
    if args.json:
        print(json.dumps(result))
        return
    print(machine_line(result["machine"]))
    print(f"\nprefill of {args.tokens} tokens: moec {moec['prefill_tok_s']:.1f} tok/s, transformers fp32 "
          f"{torch_tok_s:.1f} tok/s ({moec['prefill_tok_s'] / torch_tok_s:.2f}x)")
    print(f"the {len(scans)} Scans, each run alone: {scan:.3f} s of the prefill's {prefill:.3f} s "
          f"({result['scan_share']:.1%})\n")
    total = sum(ops.values())
    print("one profiled prefill, the main graph's nodes (the Scans inflated by the profiling of their bodies):\n")
    print("| operator | s | share |\n|---|---|---|")
    for op, seconds in list(ops.items())[:10]:
        print(f"| {op} | {seconds:.4f} | {seconds / total:.1%} |")


if __name__ == "__main__":
    main()
