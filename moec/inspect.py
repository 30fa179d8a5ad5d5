"""`moec inspect`: what an artifact holds, from its build record and graph (weights not loaded)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from moec.runtime import MODEL_FILE, read_record


def describe(path: str | Path) -> dict:
    import onnx

    path = Path(path)
    record = read_record(path)
    graph = onnx.load(str(path / MODEL_FILE), load_external_data=False).graph
    ops = Counter(f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in graph.node)
    layers = record["moe_layers"]
    return {
        "path": str(path),
        "model_type": record["source_model"]["model_type"],
        "source_model": record["source_model"]["path"],
        "target": record["target"],
        "num_layers": record["num_layers"],
        "moe_layers": [entry["layer"] for entry in layers],
        "experts_per_layer": sorted({entry["num_experts"] for entry in layers}),
        "top_k": sorted({entry["routing"]["top_k"] for entry in layers}),
        "scoring": sorted({entry["routing"]["scoring"] for entry in layers}),
        "parameters": record["parameters"],
        "bytes": record["bytes"],
        "source_weight_bytes": record["source_model"]["weight_bytes"],
        "nodes": sum(ops.values()),
        "op_types": dict(ops.most_common()),
        "verification": record.get("verification"),
        "quantization": None if not record.get("quantization") else
        {k: v for k, v in record["quantization"].items() if k not in ("experts", "non_expert")} |
        {"bits": [[e["bits"] for e in layer["experts"]] for layer in record["quantization"]["experts"]]},
    }


def summary(info: dict) -> str:
    mib = lambda n: f"{n / 2**20:.2f} MiB"  # noqa: E731
    params = info["parameters"]
    verification = info["verification"] or {}
    lines = [
        f"artifact     {info['path']}",
        f"model        {info['model_type']} from {info['source_model']}",
        f"target       {info['target']}",
        f"layers       {info['num_layers']} ({len(info['moe_layers'])} MoE: {_ranges(info['moe_layers'])})",
        f"experts      {', '.join(map(str, info['experts_per_layer']))} per layer, "
        f"top-{'/'.join(map(str, info['top_k']))}, {'/'.join(info['scoring'])} routing",
        f"parameters   {params['total']:,} ({params['experts']:,} in experts, "
        f"{params['experts'] / max(params['total'], 1):.0%})",
        f"size         {mib(info['bytes']['total'])} (source safetensors {mib(info['source_weight_bytes'])})",
        f"graph        {info['nodes']} nodes; "
        + ", ".join(f"{op} {n}" for op, n in list(info["op_types"].items())[:6]),
    ]
    quantization = info["quantization"]
    if quantization:
        lines.append(f"quantized    {quantization['method']} group {quantization['group_size']}, "
                     f"{quantization['avg_expert_bits']:.2f} avg expert bits, experts {mib(quantization['expert_bytes'])}")
        lines += [f"  layer {layer:<3} bits {' '.join(f'{b:>2}' for b in row)}"
                  for layer, row in zip(info["moe_layers"], quantization["bits"])]
    if verification:
        lines.append(f"verified     max |logit diff| {verification['max_abs_logit_diff']:.2e} "
                     f"vs {verification['against']} (tolerance {verification['tolerance']:g})")
    return "\n".join(lines)


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5] → '0-2, 5'."""
    parts, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(parts)
