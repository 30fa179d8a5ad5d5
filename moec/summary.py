"""`moec inspect`: what an artifact holds, from its build record and graph (weights not loaded);
`plot` draws the bits grid and size breakdown, `serve_netron` shows the graph in netron."""

from __future__ import annotations

import io
import math
import re
from collections import Counter
from pathlib import Path

from moec.ops.moe import EXPERT_WEIGHT_PATTERN, MERGED_JOIN, MERGED_ROWS, QMOE_GROUP_PATTERN
from moec.policy import weight_category
from moec.runtime import MODEL_FILE, read_record

PACKED_SUFFIXES = (".q", ".scales", ".zero_points", ".bias")


def describe_stats(path: str | Path) -> dict:
    """What a moec-stats/1 file measured, and the super experts it found."""
    from moec.planner import load_stats

    stats = load_stats(path)
    peaks = {(layer["layer"], e): expert.get("max_down_output") for layer in stats["layers"]
             for e, expert in enumerate(layer["experts"])}
    return {"path": str(path), "model": stats["model"], "calibration": stats["calibration"],
            "moe_layers": [layer["layer"] for layer in stats["layers"]],
            "super_experts": [{"layer": layer, "expert": e, "max_down_output": peaks[(layer, e)]}
                              for layer, e in stats.get("super_experts", [])]}


def stats_summary(info: dict) -> str:
    model, calibration = info["model"], info["calibration"]
    return "\n".join([
        f"stats        {info['path']}",
        f"model        {model['model_type']} from {model['name_or_path']}: {len(info['moe_layers'])} MoE layers of "
        f"{model['num_experts']} experts, top-{model.get('top_k', '?')}",
        f"calibration  {calibration['samples']} x {calibration['seq_len']} tokens from {calibration['data']}; "
        f"loss at widths {', '.join(map(str, calibration['bits']))}",
        "super experts " + (", ".join(f"layer {x['layer']} expert {x['expert']} (max |down_proj output| "
                                      f"{x['max_down_output']:.4g})" for x in info["super_experts"]) or "none"),
    ])


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
        "source_format": record["source_model"].get("format", "float"),
        "target": record["target"],
        "num_layers": record["num_layers"],
        "moe_layers": [entry["layer"] for entry in layers],
        "experts_per_layer": sorted({entry["num_experts"] for entry in layers}),
        "top_k": sorted({entry["top_k"] for entry in layers}),
        "activation": sorted({entry["experts"]["activation"] for entry in layers}),
        "parameters": record["parameters"],
        "bytes": record["bytes"],
        "source_weight_bytes": record["source_model"]["weight_bytes"],
        "nodes": sum(ops.values()),
        "kv_in_place": record.get("kv_in_place", []),
        "op_types": dict(ops.most_common()),
        "size_breakdown": size_breakdown(graph, [entry["experts_module"].rpartition(".")[0] for entry in layers]),
        "pruning": record.get("pruning"),
        "super_experts": record.get("super_experts", []),
        "dropped_experts": record.get("dropped_experts", []),
        "verification": record.get("verification"),
        "quantization": None if not record.get("quantization") else
        {k: v for k, v in record["quantization"].items() if k not in ("experts", "non_expert")} |
        {"bits": [[e["bits"] for e in layer["experts"]] for layer in record["quantization"]["experts"]]} |
        ({"down_bits": [[e.get("down_bits", e["bits"]) for e in layer["experts"]]
                        for layer in record["quantization"]["experts"]]}
         if any("down_bits" in e for layer in record["quantization"]["experts"] for e in layer["experts"]) else {}),
    }


def _width_labels(quantization: dict) -> list[list[str]]:
    """Each expert's width as shown: fp for float, gate-and-up/down where down_proj has its own."""
    def label(whole, down):
        text = "fp" if whole == "float" else str(whole)
        return text if down == whole else f"{text}/{down}"

    return [[label(*pair) for pair in zip(row, down)]
            for row, down in zip(quantization["bits"], quantization.get("down_bits", quantization["bits"]))]


def size_breakdown(graph, moe_blocks: list[str]) -> dict[str, int]:
    """Stored bytes per component, from each initializer's recorded length (no data is read)."""
    import onnx

    sizes: Counter = Counter()
    for tensor in graph.initializer:
        external = {entry.key: entry.value for entry in tensor.external_data}
        if "length" in external:
            nbytes = int(external["length"])
        elif tensor.raw_data:
            nbytes = len(tensor.raw_data)
        else:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
            nbytes = itemsize * math.prod(tensor.dims)
        sizes[_component(tensor.name, moe_blocks)] += nbytes
    return dict(sizes.most_common())


def _component(name: str, moe_blocks: list[str]) -> str:
    for suffix in PACKED_SUFFIXES:
        name = name.removesuffix(suffix)
    name = name.removesuffix(MERGED_ROWS).split(MERGED_JOIN)[0]  # merged sibling products share a part
    if re.fullmatch(EXPERT_WEIGHT_PATTERN, name) or re.fullmatch(QMOE_GROUP_PATTERN + r"\.(fc1|fc2|experts)", name):
        return "routed experts"
    category = weight_category(name, moe_blocks)
    if category is None and ("router" in name or any(name.startswith(block + ".") for block in moe_blocks)):
        return "routers"
    return {"attention": "attention", "lm_head": "lm_head", "embedding": "embeddings",
            "shared_expert": "shared experts", "dense_mlp": "dense MLPs"}.get(category, "other")


def summary(info: dict) -> str:
    mib = lambda n: f"{n / 2**20:.2f} MiB"  # noqa: E731
    params = info["parameters"]
    verification = info["verification"] or {}
    lines = [
        f"artifact     {info['path']}",
        f"model        {info['model_type']} from {info['source_model']} ({info['source_format']} weights)",
        f"target       {info['target']}",
        f"layers       {info['num_layers']} ({len(info['moe_layers'])} MoE: {_ranges(info['moe_layers'])})",
        f"experts      {', '.join(map(str, info['experts_per_layer']))} per layer, "
        f"top-{'/'.join(map(str, info['top_k']))}, {'/'.join(info['activation'])} experts",
        f"parameters   {params['total']:,} ({params['experts']:,} in experts, "
        f"{params['experts'] / max(params['total'], 1):.0%})",
        f"size         {mib(info['bytes']['total'])} (source safetensors {mib(info['source_weight_bytes'])})",
        f"graph        {info['nodes']} nodes; "
        + ", ".join(f"{op} {n}" for op, n in list(info["op_types"].items())[:6]),
    ]
    if info["kv_in_place"]:
        layers_in_place = sorted({int(name.split(".")[1]) for name in info["kv_in_place"]})
        lines.append(f"kv cache     appended in place in {len(layers_in_place)} layers "
                     f"({_ranges(layers_in_place)}: GroupQueryAttention)")
    quantization = info["quantization"]
    if quantization:
        lines.append(f"quantized    {quantization['method']} group {quantization['group_size']}, "
                     f"{quantization['avg_expert_bits']:.2f} avg expert bits, experts {mib(quantization['expert_bytes'])}")
        kernels = [f"{n} experts in {kernel.removeprefix('com.microsoft.')}"
                   for kernel, n in quantization.get("kernels", {}).items() if n]
        if kernels:
            lines.append("  kernels    " + ", ".join(kernels))
        lines += [f"  layer {layer:<3} bits {' '.join(f'{b:>2}' for b in row)}"
                  for layer, row in zip(info["moe_layers"], _width_labels(quantization))]
    lines.append("size by part " + ", ".join(f"{part} {mib(n)}" for part, n in info["size_breakdown"].items()))
    pruning = info["pruning"]

    def rule(entry):
        return " ".join(f"{key.replace('_', '-')} {entry[key]:g}" for key in ("beta", "top_p") if key in entry)

    lines.append("pruning      " + ("none" if not pruning else
                                    ", ".join(f"layer {e['layer']} {rule(e)}" for e in pruning["layers"])
                                    + f"; protect {pruning['protect_fraction']:g} (switch: prune_experts)"))
    for key, title in (("super_experts", "super experts (never pruned)"), ("dropped_experts", "dropped experts")):
        if info[key]:
            lines.append(f"{title}: " + ", ".join(f"layer {layer} expert {e}" for layer, e in info[key]))
    if verification:
        lines.append(f"verified     max |logit diff| {verification['max_abs_logit_diff']:.2e} "
                     f"vs {verification['against']} (tolerance {verification['tolerance']:g})")
        if "steps" in verification:  # artifacts built before cached decode was verified have none
            steps = (f"{step['step']}{' of %d tokens' % step['tokens'] if step['tokens'] > 1 else ''} "
                     f"{step['max_abs_logit_diff']:.1e}" for step in verification["steps"])
            lines.append(f"  steps      {', '.join(steps)}; pasts fed back {' and '.join(verification['pasts'])}")
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


def plot(info: dict, path: str | Path) -> None:
    """The bits per expert as a layers x experts heatmap, with the size breakdown beside it."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    from moec.files import write_atomic

    figure = Figure(figsize=(11, 4.5), dpi=120)
    FigureCanvasAgg(figure)
    grid_axes, size_axes = figure.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    quantization = info["quantization"]
    if quantization:
        bits = np.array([[32 if b == "float" else b for b in row] for row in quantization["bits"]], float)
        image = grid_axes.imshow(bits, cmap="viridis_r", aspect="auto", norm=LogNorm(1, 32))
        labels = _width_labels(quantization)
        for (row, col), value in np.ndenumerate(bits):
            grid_axes.text(col, row, "32" if value == 32 else labels[row][col], ha="center", va="center",
                           fontsize=8, color="black" if value <= 4 else "white")
        figure.colorbar(image, ax=grid_axes, label="bits (32: float)", ticks=[1, 2, 4, 8, 32], format="%g")
        grid_axes.set_yticks(range(len(bits)), [str(layer) for layer in info["moe_layers"]])
        grid_axes.set_title(f"bits per expert ({quantization['avg_expert_bits']:.2f} average)")
    else:
        grid_axes.text(0.5, 0.5, "not quantized (fp32)", ha="center", va="center")
        grid_axes.set_title("bits per expert")
    grid_axes.set_xlabel("expert")
    grid_axes.set_ylabel("layer")
    parts = list(info["size_breakdown"].items())
    size_axes.barh([part for part, _ in parts], [n / 2**20 for _, n in parts], color="tab:blue")
    size_axes.invert_yaxis()
    size_axes.set_xlabel("MiB")
    size_axes.set_title(f"size: {info['bytes']['total'] / 2**20:.1f} MiB")
    figure.suptitle(f"{info['model_type']} — {info['path']}", fontsize=9)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format=Path(path).suffix.lstrip(".").lower() or "png")
    write_atomic(Path(path), buffer.getvalue())


def serve_netron(path: str | Path, port: int = 8080) -> tuple[str, int]:
    """Serve the artifact's graph with netron on localhost (the `netron` extra); returns the address."""
    try:
        import netron
    except ImportError:
        from moec.errors import MoecError

        raise MoecError("--netron needs the netron package (pip install netron)") from None
    return netron.start(str(Path(path) / MODEL_FILE), address=("localhost", port), browse=False)
