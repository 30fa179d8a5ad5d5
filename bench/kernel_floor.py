"""The floor under an artifact's decode step: its weight-reading kernels alone, as one token runs them.

Builds a graph of just the artifact's MatMulNBits, QMoE and GatherBlockQuantized nodes (If branches
included) with their weights, each fed one token's random activations: every non-expert node,
and in each MoE layer the top_k experts of a random routing, a new one each run (per-expert
MatMulNBits and QMoE groups alike). It times that graph (median of the runs) beside the whole
artifact's decode step, and gives both as a fraction of the bandwidth limit (read bandwidth / the
weight bytes a token reads: the non-expert ones and top_k / experts of the experts'). What the
floor cannot reach, no graph change can: only a faster kernel.

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

from moec.ops.moe import EXPERT_WEIGHT_PATTERN, QMOE_GROUP_PATTERN  # noqa: E402

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


def floor_model(artifact: Path, seed: int, routings: int = 32):
    """(the floor graph, a list of feeds, one per random routing, the weight bytes a token reads on
    average). Every expert's MatMulNBits is in the graph with an input of its own, of one row where
    the routing picks the expert and of none elsewhere (0.7 us); a QMoE group's router input picks
    the routing's experts of the group. The runs cycle through the routings, so that, as in decoding,
    the experts read change from token to token and the last token's are not still in the cache."""
    import onnx
    from onnx import TensorProto, helper

    from moec.runtime import MODEL_FILE, read_record

    record = read_record(artifact)
    rng = np.random.default_rng(seed)
    layers = {m["layer"]: m for m in record["moe_layers"]}
    model = onnx.load(str(artifact / MODEL_FILE))
    initializers = {t.name: t for t in model.graph.initializer}
    nodes, inputs, used, read = [], {}, {}, 0.0
    experts_in, groups = [], []  # (input, layer, expert, K); (router input, layer, the group's experts)

    def declare(name, dtype, shape):
        inputs[name] = helper.make_tensor_value_info(name, dtype, shape)
        return name

    for index, node in enumerate(n for n in _nodes(model.graph) if n.op_type in KERNELS):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weights = [name for name in node.input if name in initializers]
        weight_bytes = sum(_nbytes(initializers[w]) for w in weights)
        expert = re.match(EXPERT_WEIGHT_PATTERN, node.input[1])  # a merged gate+up: its first part's
        if node.op_type == "MatMulNBits" and expert:
            layer = int(expert["layer"])
            first = declare(f"x{index}", TensorProto.FLOAT, [None, attrs["K"]])
            experts_in.append((first, layer, int(expert["expert"]), attrs["K"]))
            node_inputs = [first, *node.input[1:]]
            read += weight_bytes * layers[layer]["top_k"] / layers[layer]["num_experts"]
        elif node.op_type == "MatMulNBits":
            first = declare(f"x{attrs['K']}", TensorProto.FLOAT, [1, attrs["K"]])
            node_inputs = [first, *node.input[1:]]
            read += weight_bytes
        elif node.op_type == "QMoE":
            group = re.match(QMOE_GROUP_PATTERN, node.input[2])  # {prefix}.fc1.q beside {prefix}.experts
            members = onnx.numpy_helper.to_array(initializers[f"{group[0]}.experts"]).tolist()
            layer = int(group["layer"])
            hidden = initializers[node.input[5]].dims[1]  # fc2's rows
            first = declare(f"x_moe{hidden}", TensorProto.FLOAT, [1, hidden])
            router = declare(f"router{index}", TensorProto.FLOAT, [1, len(members)])
            groups.append((router, layer, members))
            node_inputs = [first, router, *node.input[2:14], router]
            stacked = sum(_nbytes(initializers[w]) for w in weights if not w.endswith(".experts"))
            read += stacked * layers[layer]["top_k"] / layers[layer]["num_experts"]
        else:  # an embedding row
            vocab = initializers[node.input[0]].dims[0]
            node_inputs = [node.input[0], declare("token", TensorProto.INT64, [1, 1]), *node.input[2:]]
            read += weight_bytes / vocab
        for name in weights:
            used[name] = initializers[name]
        nodes.append(helper.make_node(node.op_type, node_inputs, [f"y{index}"], domain=node.domain, **attrs))
    outputs = [helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT, None) for n in nodes]
    graph = helper.make_graph(nodes, "kernel_floor", list(inputs.values()), outputs, list(used.values()))
    floor = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)

    shared = {name: rng.standard_normal([int(d.dim_value) for d in v.type.tensor_type.shape.dim]).astype(np.float32)
              for name, v in inputs.items() if name.startswith("x") and name not in {e[0] for e in experts_in}}
    feeds = []
    for _ in range(routings):
        routed = {layer: set(rng.choice(m["num_experts"], m["top_k"], replace=False).tolist())
                  for layer, m in layers.items()}
        feed = dict(shared)
        if "token" in inputs:
            feed["token"] = rng.integers(0, 1000, (1, 1))
        for name, layer, expert, k in experts_in:
            feed[name] = rng.standard_normal((int(expert in routed[layer]), k)).astype(np.float32)
        for name, layer, members in groups:
            feed[name] = np.array([[float(e in routed[layer]) for e in members]], np.float32)
        feeds.append(feed)
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
    for run in range(10):
        session.run(None, feeds[run % len(feeds)])
    times = []
    for run in range(args.runs):
        start = time.perf_counter()
        session.run(None, feeds[run % len(feeds)])
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
