"""The floor under an artifact's decode step: its weight-reading kernels alone, as one token runs them.

Builds a graph of just the artifact's MatMulNBits, QMoE and GatherBlockQuantized nodes (If branches
included) with their weights, each fed one token's random activations: every non-expert node,
and in each MoE layer the top_k experts of one random routing (the same routing for per-expert
MatMulNBits and QMoE groups). It times that graph (median of the runs) beside the whole artifact's
decode step, and gives both as a fraction of the bandwidth limit (read bandwidth / the weight bytes
the floor graph reads). What the floor cannot reach, no graph change can: only a faster kernel.

    python bench/kernel_floor.py ARTIFACT [--threads 2] [--runs 200] [--seed 0] [--json]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import machine, read_bandwidth  # noqa: E402

EXPERT_WEIGHT = re.compile(r"layers\.(\d+)\.experts\.(\d+)\.")
KERNELS = ("MatMulNBits", "QMoE", "GatherBlockQuantized")


def _nodes(graph):
    """The graph's nodes and those of its If branches."""
    import onnx

    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(attr.g)


def _nbytes(tensor) -> int:
    import onnx

    return len(tensor.raw_data) if tensor.HasField("raw_data") else onnx.numpy_helper.to_array(tensor).nbytes


def floor_model(artifact: Path, seed: int):
    """(the floor graph, its feeds, the weight bytes it reads)."""
    import onnx
    from onnx import TensorProto, helper

    from moec.runtime import MODEL_FILE, read_record

    record = read_record(artifact)
    rng = np.random.default_rng(seed)
    routed = {m["layer"]: set(rng.choice(m["num_experts"], m["top_k"], replace=False).tolist())
              for m in record["moe_layers"]}
    model = onnx.load(str(artifact / MODEL_FILE))
    initializers = {t.name: t for t in model.graph.initializer}
    nodes, inputs, feeds, used, read = [], {}, {}, {}, 0

    def activation(name, shape, dtype=np.float32, values=None):
        if name not in feeds:
            feeds[name] = rng.standard_normal(shape).astype(dtype) if values is None else values
            inputs[name] = helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(feeds[name].dtype),
                                                         list(shape))
        return name

    for index, node in enumerate(n for n in _nodes(model.graph) if n.op_type in KERNELS):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weights = [name for name in node.input if name in initializers]
        expert = EXPERT_WEIGHT.search(node.input[1])
        if node.op_type == "MatMulNBits":
            if expert and int(expert.group(2)) not in routed.get(int(expert.group(1)), ()):
                continue
            first = activation(f"x{attrs['K']}", (1, attrs["K"]))
            node_inputs = [first, *node.input[1:]]
            read += sum(_nbytes(initializers[w]) for w in weights)
        elif node.op_type == "QMoE":
            layer = int(re.search(r"layers\.(\d+)\.", node.input[2]).group(1))
            members = onnx.numpy_helper.to_array(initializers[node.input[2].rsplit(".", 2)[0] + ".experts"]) \
                if node.input[2].rsplit(".", 2)[0] + ".experts" in initializers else None
            if members is None:
                raise SystemExit(f"{node.name}: no expert list beside its weights")
            mine = [i for i, e in enumerate(members.tolist()) if e in routed[layer]]
            hidden = onnx.numpy_helper.to_array(initializers[node.input[5]]).shape[1]  # fc2 rows
            probs = np.zeros((1, len(members)), np.float32)
            probs[0, mine] = 1
            first = activation("x_moe", (1, hidden))
            probs_name = activation(f"probs{index}", probs.shape, values=probs)
            node_inputs = [first, probs_name, *node.input[2:14], probs_name]
            share = len(mine) / len(members)  # of the stacked experts, the routed ones are read
            read += share * sum(_nbytes(initializers[w]) for w in weights if not w.endswith(".experts"))
        else:  # an embedding row
            vocab = initializers[node.input[0]].dims[0]
            indices = activation("token", (1, 1), np.int64, rng.integers(0, vocab, (1, 1)))
            node_inputs = [node.input[0], indices, *node.input[2:]]
            read += sum(_nbytes(initializers[w]) for w in weights) / vocab
        for name in weights:
            used[name] = initializers[name]
        out = f"y{index}"
        nodes.append(helper.make_node(node.op_type, node_inputs, [out], domain=node.domain, **attrs))
    outputs = [helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT, None) for n in nodes]
    graph = helper.make_graph(nodes, "kernel_floor", list(inputs.values()), outputs, list(used.values()))
    floor = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    return floor, feeds, read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--threads", default=2, type=int)
    parser.add_argument("--runs", default=200, type=int)
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import onnxruntime as ort

    from moec.bench import bench

    floor, feeds, read = floor_model(args.artifact, args.seed)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(floor.SerializeToString(), options, providers=["CPUExecutionProvider"])
    for _ in range(10):
        session.run(None, feeds)
    times = []
    for _ in range(args.runs):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    floor_s = statistics.median(times)
    decode = bench(args.artifact, threads=args.threads, repeats=3)["decode_tok_s"]
    args.bandwidth = read_bandwidth(args.threads)
    limit = args.bandwidth / read
    result = {"artifact": str(args.artifact), "machine": machine(args), "kernel_nodes": len(floor.graph.node),
              "weight_bytes_per_token": read, "bandwidth_limit_tok_s": limit,
              "kernel_floor_ms": 1000 * floor_s, "kernel_floor_tok_s": 1 / floor_s,
              "kernel_floor_of_bandwidth": 1 / floor_s / limit,
              "decode_tok_s": decode, "decode_of_bandwidth": decode / limit}
    if args.json:
        print(json.dumps(result, indent=1))
        return
    m = result["machine"]
    print(f"{m['cpu']} (ISA: {' '.join(m['isa'])}), {args.threads} threads, read bandwidth "
          f"{args.bandwidth / 1e9:.1f} GB/s; {read / 2**20:.1f} MiB of weights a token, limit {limit:.0f} tok/s")
    print(f"| {args.artifact.name} | tok/s | of bandwidth limit |\n|---|---|---|")
    print(f"| kernels alone ({result['kernel_nodes']} nodes) | {1 / floor_s:.1f} | "
          f"{result['kernel_floor_of_bandwidth']:.0%} |")
    print(f"| whole decode step | {decode:.1f} | {result['decode_of_bandwidth']:.0%} |")


if __name__ == "__main__":
    sys.exit(main())
