"""`moec profile`: what a decode step costs on this host, per routed expert at each width and for the
rest of the step, for the planner's speed budget (`moec plan --profile FILE --decode-tok-s N`).

For each width, a graph of MoE layers like the artifact's (experts, top-k, layout and dims), every
expert at that width, is lowered by the artifact's target as compile lowers it (per-expert
MatMulNBits, or QMoE in layers of many experts; the plan's group size, the target's accuracy level),
and decodes one token through every layer, each with its own random routing. A layer's time for one
token, over its top-k, is an expert's time at that width: each layer's routing and gathering
included. The graph holds as many layers as make the artifact's expert bytes (up to
MAX_GRAPH_BYTES), so the weights meet the caches as the artifact's do: on a host whose last-level
cache holds a 2-bit model but not an 8-bit one, 8-bit experts timed in an 8-bit model would read
from memory what a mixed artifact reads from cache. Layers of one artifact are taken to be alike
(one time for all). The rest of a decode step (attention, norms, router, head) is the artifact's
own step (moec.bench, pruning off) less its experts' time at its plan's widths, routed uniformly.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from moec.errors import MoecError
from moec.planner.speed import PROFILE_FORMAT

DEFAULT_WIDTHS = (2, 3, 4, 8)
# a width's graph holds at most this many expert bytes (at least one layer): past the caches either
# way, and a large model's experts at 8 bits might not fit in memory
MAX_GRAPH_BYTES = 2 * 2**30


def expert_dims(record: dict, config: dict) -> tuple[int, int]:
    """(hidden, intermediate) of the artifact's routed experts (every layer's the same size), from its
    parameter count: experts x projections x hidden x intermediate."""
    hidden = (config.get("text_config") or config)["hidden_size"]
    matrices = sum(entry["num_experts"] * _projections(entry) for entry in record["moe_layers"])
    if record["parameters"]["experts"] % (matrices * hidden):
        raise MoecError("cannot read the experts' dims from the artifact's moec.json and config.json")
    return hidden, record["parameters"]["experts"] // (matrices * hidden)


def _layers_graph(layers: list[dict], hidden: int, intermediate: int, bits: int, group_size: int, target):
    """MoE layers (moec.json's `moe_layers` entries) as moec::Experts nodes side by side on one token's
    hidden state (their outputs summed), every expert quantized to `bits` with random codes, lowered
    for `target`."""
    import onnx_ir as ir

    from moec.ops.moe import INPUT_NAMES, ExpertsSpec, expert_weight_name
    from moec.quant import QuantizedWeight, Quantizer

    rng = np.random.default_rng(0)

    def codes(rows: int, columns: int) -> QuantizedWeight:
        blocks = -(-columns // group_size)
        return QuantizedWeight(rng.integers(0, 2**bits, (rows, columns), dtype=np.uint8),
                               rng.uniform(0.001, 0.01, (rows, blocks)).astype(np.float32),
                               np.full((rows, blocks), 2 ** (bits - 1), np.uint8), bits, group_size)

    x = ir.Value(name="hidden", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, hidden]))
    inputs, nodes, initializers, specs, outputs = [x], [], [], {}, []
    for entry in layers:
        spec = ExpertsSpec.from_attributes(entry["experts"])
        layer, experts, top_k = entry["layer"], entry["num_experts"], entry["top_k"]
        shapes = {p: (hidden, intermediate) if p == "down" else (intermediate, hidden) for p in spec.projections}
        quantized = {} if bits == "float" else {p: codes(*shape) for p, shape in shapes.items()}  # shared codes
        for e in range(experts if bits != "float" else 0):  # float experts: no spec, the lowering keeps MatMuls
            for p in spec.projections:
                specs[expert_weight_name(layer, e, p)] = Quantizer(bits, group_size, target.container_bits[bits],
                                                                   result=quantized[p])
        first = intermediate if spec.gate == "none" else 2 * intermediate
        stored = {"gate_up": (experts, first, hidden), "down": (experts, hidden, intermediate)}
        if spec.transposed:
            stored = {k: (s[0], s[2], s[1]) for k, s in stored.items()}
        weights = {}
        for name, shape in stored.items():  # read only for float experts: quantized ones have their codes
            weights[name] = ir.Value(name=f"layers.{layer}.{name}", const_value=ir.LazyTensor(
                lambda shape=shape: ir.tensor(rng.normal(0, 0.02, shape).astype(np.float32)), dtype=ir.DataType.FLOAT,
                shape=ir.Shape(shape)))
        initializers += weights.values()
        index = ir.Value(name=f"top_k_index.{layer}", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([1, top_k]))
        routing = ir.Value(name=f"top_k_weights.{layer}", type=ir.TensorType(ir.DataType.FLOAT),
                           shape=ir.Shape([1, top_k]))
        inputs += [index, routing]
        node = ir.node("Experts", [x, index, routing, *(weights.get(n) for n in INPUT_NAMES[3:])],
                       attributes=spec.attributes(), domain="moec")
        nodes.append(node)
        outputs.append(node.outputs[0])
    total = outputs[0]
    for out in outputs[1:]:
        add = ir.node("Add", [total, out])
        nodes.append(add)
        total = add.outputs[0]
    total.name = "output"
    graph = ir.Graph(inputs, [total], nodes=nodes, initializers=initializers, opset_imports={"": 23, "moec": 1})
    model = ir.Model(graph, ir_version=10)
    ir.passes.PassManager(target.passes(specs, {}))(model)
    return model


def _time_layers(layers: list[dict], model, threads: int | None, runs: int) -> float:
    """Median seconds for one token through every layer of `model`, each with fresh random routing."""
    import tempfile

    import onnx_ir as ir
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    with tempfile.TemporaryDirectory() as folder:  # weights beside the graph: past protobuf's 2 GB
        ir.save(model, Path(folder) / "layers.onnx", external_data="layers.onnx.data")
        session = ort.InferenceSession(str(Path(folder) / "layers.onnx"), options, providers=["CPUExecutionProvider"])
    hidden = np.random.default_rng(1).normal(size=(1, model.graph.inputs[0].shape[1])).astype(np.float32)
    rng = np.random.default_rng(2)
    times = []
    for run in range(runs + 2):
        feed = {"hidden": hidden}
        for entry in layers:
            chosen = rng.choice(entry["num_experts"], entry["top_k"], replace=False)
            feed[f"top_k_index.{entry['layer']}"] = chosen[None].astype(np.int64)
            feed[f"top_k_weights.{entry['layer']}"] = np.full((1, entry["top_k"]), 1 / entry["top_k"], np.float32)
        start = time.perf_counter()
        session.run(None, feed)
        if run >= 2:  # two warm-up runs
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def profile(artifact: str | Path, *, widths=None, threads: int | None = None, runs: int = 50,
            step_tokens: int = 32, progress: bool = True) -> dict:
    """The host's decode costs for `artifact`'s shape (see the module docstring): per MoE layer, the
    seconds of one routed expert's token at each of `widths` (default DEFAULT_WIDTHS) and the
    artifact's own; and the rest of a decode step."""
    import json

    from tqdm import tqdm

    from moec.bench import bench
    from moec.targets import get_target

    artifact = Path(artifact)
    record = json.loads((artifact / "moec.json").read_text())
    config = json.loads((artifact / "config.json").read_text())
    if not record["moe_layers"]:
        raise MoecError(f"{artifact}: the artifact has no MoE layer to profile")
    target = get_target(record["target"])
    if "CPUExecutionProvider" not in target.providers:
        raise MoecError(f"{artifact}: moec profile times CPU artifacts; this one is for {record['target']}")
    quantization = record.get("quantization") or {}
    group_size = quantization.get("group_size", 128)
    hidden, intermediate = expert_dims(record, config)
    planned = _planned_widths(record)
    own = {w for row in planned.values() for w in row if w != 0}  # timed too: the rest of a step needs them
    widths = sorted(set(widths or DEFAULT_WIDTHS) | own, key=lambda w: (w == "float", 0 if w == "float" else w))
    artifact_bytes = sum(_expert_bytes(entry, hidden, intermediate, w, target) / entry["num_experts"]
                         for entry in record["moe_layers"] for w in planned[entry["layer"]] if w != 0)
    seconds = {}
    for bits in tqdm(widths, desc="profile", unit="width", disable=not progress):
        layer_bytes = max(_expert_bytes(entry, hidden, intermediate, bits, target) for entry in record["moe_layers"])
        copies = max(1, round(min(artifact_bytes, MAX_GRAPH_BYTES) / layer_bytes))
        layers = [_renumbered(record["moe_layers"][i % len(record["moe_layers"])], i) for i in range(copies)]
        model = _layers_graph(layers, hidden, intermediate, bits, group_size, target)
        per_token = _time_layers(layers, model, threads, runs)
        seconds[bits] = per_token / sum(entry["top_k"] for entry in layers)
    step = 1 / bench(artifact, prompt_len=step_tokens, gen_len=step_tokens, threads=threads, repeats=3,
                     prune=False)["decode_tok_s"]
    experts = sum(entry["top_k"] * float(np.mean([0 if w == 0 else seconds[w] for w in planned[entry["layer"]]]))
                  for entry in record["moe_layers"])
    return {
        "format": PROFILE_FORMAT,
        "artifact": str(artifact),
        "host": _host(threads),
        "target": record["target"],
        "group_size": group_size,
        "num_layers": record["num_layers"],
        "layers": [{"layer": entry["layer"], "num_experts": entry["num_experts"], "top_k": entry["top_k"],
                    "expert_seconds": {str(b): s for b, s in seconds.items()}} for entry in record["moe_layers"]],
        "step_seconds": step,
        "other_seconds": max(step - experts, 0.0),
    }


def _renumbered(entry: dict, layer: int) -> dict:
    """A moe_layers entry as layer `layer` (its weights' names follow)."""
    return entry | {"layer": layer, "experts": entry["experts"] | {"layer": layer}}


def _expert_bytes(entry: dict, hidden: int, intermediate: int, bits, target) -> int:
    """A layer's expert weight bytes at `bits` in the target's container (float: 4 bytes a weight)."""
    weight_bytes = 4 if bits == "float" else target.container_bits[bits] / 8
    return int(entry["num_experts"] * _projections(entry) * hidden * intermediate * weight_bytes)


def _projections(entry: dict) -> int:
    """How many matrices one expert of a moe_layers entry has (gate, up, down; or up, down)."""
    from moec.ops.moe import ExpertsSpec

    return len(ExpertsSpec.from_attributes(entry["experts"]).projections)


def _planned_widths(record: dict) -> dict[int, list]:
    """Each MoE layer's expert widths in the artifact: the plan's, or float where it has none."""
    rows = {row["layer"]: [x["bits"] for x in row["experts"]] for row in (record.get("quantization") or {})
            .get("experts", [])}
    return {entry["layer"]: rows.get(entry["layer"], ["float"] * entry["num_experts"])
            for entry in record["moe_layers"]}


def _host(threads: int | None) -> dict:
    import os

    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "unknown CPU")
    flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    isa = sorted(f for f in flags if f in ("avx2", "avx_vnni") or f.startswith(("avx512", "amx")))
    return {"cpu": cpu, "isa": isa, "cores": os.cpu_count(), "threads": threads}
