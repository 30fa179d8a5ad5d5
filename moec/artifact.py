"""The artifact's files: initializer order, the graph's metadata, the folder's file sizes."""

from __future__ import annotations

import json
from pathlib import Path

from moec.runtime import MODEL_FILE

EXTERNAL_DATA_FILE = MODEL_FILE + ".data"


def in_layer_order(graph, experts_paths: list[str]) -> None:
    """Order the initializers by decoder layer, a layer's routed experts (per expert, and its QMoE
    groups) after the rest, so writing them materializes each experts module once."""
    import re

    from moec.ops.moe import EXPERT_WEIGHT_PATTERN, QMOE_GROUP_PATTERN

    def key(value) -> tuple[int, bool]:
        found = re.search(r"(?:^|\.)layers\.(\d+)\.", value.name)
        patterns = (EXPERT_WEIGHT_PATTERN, QMOE_GROUP_PATTERN + r"\.")
        in_block = any(re.match(pattern, value.name) for pattern in patterns) or \
            any(value.name.startswith(path + ".") for path in experts_paths)
        return (int(found[1]) if found else -1, in_block)

    values = sorted(graph.initializers.values(), key=key)  # stable: keeps the order within a group
    graph.initializers.clear()
    for value in values:
        graph.register_initializer(value)


def past_shapes(graph) -> dict[str, tuple[int, ...]]:
    """Each past_key_values input's name and shape for batch 1 and a fresh sequence."""
    from moec.runtime import empty_shape

    return {v.name: empty_shape(v.shape, 1) for v in graph.graph.inputs if v.name.startswith("past_key_values.")}


def metadata_props(record: dict) -> dict[str, str]:
    """What the build record says of the model, for its metadata_props: people and tools that open
    only model.onnx (netron, onnxruntime's ModelMetadata) see it. Plain onnxruntime reads the session
    options in `ort_config` when ORT_LOAD_CONFIG_FROM_MODEL=1."""
    import onnxruntime as ort

    quantization = record["quantization"] or {}
    tuned = record["session_options"]
    optimization = int(getattr(ort.GraphOptimizationLevel, tuned["graph_optimization_level"]))
    return {"moec.version": record["moec_version"], "moec.source_model": record["source_model"]["path"],
            "moec.model_type": record["source_model"]["model_type"], "moec.target": record["target"],
            "moec.avg_expert_bits": f"{quantization['avg_expert_bits']:.4f}" if quantization else "32 (float)",
            "moec.quantizer": quantization.get("method", "none"),
            "moec.pruning": json.dumps(record["pruning"]) if record["pruning"] else "none",
            "ort_config": json.dumps({"session_options": {"intra_op_num_threads": tuned["intra_op_num_threads"],
                                                          "graph_optimization_level": optimization}})}


def artifact_files(folder: Path) -> dict:
    """The record's `bytes` (graph file, external data, total) and `files` of an artifact folder."""
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    return {"bytes": {"model.onnx": files.get(MODEL_FILE, 0), "external_data": files.get(EXTERNAL_DATA_FILE, 0),
                      "total": files.get(MODEL_FILE, 0) + files.get(EXTERNAL_DATA_FILE, 0)},
            "files": sorted(files)}
