"""moec.json: what an artifact was built from, how, and what its experts take."""

from __future__ import annotations

import moec


def build_record(checkpoint, layers, graph, target, model, plan: dict | None, routing: dict,
                 quantized: dict, expert_tokens: dict) -> dict:
    """moec.json: what was built from what (the artifact's file sizes are added once it is final)."""
    config = model.config
    return {
        "format": "moec-artifact/1",
        "moec_version": moec.__version__,
        "source_model": {"path": str(checkpoint.path.resolve()), "model_type": checkpoint.model_type,
                         "weight_bytes": checkpoint.weight_bytes,
                         # the published quantized format dequantized on read, or float
                         "format": checkpoint.quant_method or "float"},
        "target": target.name,
        "providers": list(target.providers),
        "session_options": dict(target.session_options),
        "opset": graph.opset_imports.get("", None),
        "kv_in_place": kv_in_place(graph),
        "num_layers": config.num_hidden_layers,
        "moe_layers": [
            {"layer": layer.layer, "num_experts": layer.num_experts, "top_k": layer.top_k,
             "experts_module": layer.path, "experts": layer.spec.attributes(), "shared_expert": layer.shared_expert}
            for layer in layers
        ],
        "parameters": {"experts": sum(layer.num_experts * layer.expert_parameters() for layer in layers),
                       "total": sum(int(t.numel()) for t in model.parameters()) +
                       sum(int(t.numel()) for layer in layers for t in model.get_submodule(layer.block_path).buffers())},
        "quantization": None if plan is None else quantization_record(plan, layers, graph, quantized, expert_tokens),
        "pruning": pruning_record(routing),
        "super_experts": [[layer, e] for layer, change in routing.items() for e in change.get("keep_experts", ())],
        "dropped_experts": [[layer, e] for layer, change in routing.items() for e in change.get("dropped", ())],
    }


def kv_in_place(graph) -> list[str]:
    """The past inputs a GroupQueryAttention node reads (passes/group_query_attention.py): a runner
    may bind each to its present output as one buffer with room for the whole sequence, which the
    node then appends to in place (moec.runtime does)."""
    return [value.name for node in graph.graph if node.op_type == "GroupQueryAttention"
            for value in node.inputs[3:5] if value is not None]


def quantization_record(plan: dict, layers, graph, quantized: dict, expert_tokens: dict) -> dict:
    """Per expert: width (0: dropped), its kernel (MatMulNBits per projection, or its layer's QMoE node
    of that width) and the container it is stored in, bytes (of its initializers in `graph`; a QMoE
    group's shared evenly), quantizer and calibration tokens; totals, averages, and the experts GPTQ
    had too few tokens for."""
    import re

    from moec.ops.moe import EXPERT_WEIGHT_PATTERN, expert_weight_name
    from moec.planner import FLOAT
    from moec.planner.plan import plan_grid, plan_layer_prior
    from moec.planner.sizes import DROPPED

    experts, expert_bytes, weighted_bits = [], 0, 0.0
    fused, merged = _qmoe_experts(graph), _merged_products(graph)
    for layer in layers:
        row = []
        projections = layer.spec.projections
        for e in range(layer.num_experts):
            parts = [quantized.get(expert_weight_name(layer.layer, e, p)) for p in projections]
            if plan["experts"]["bits"][layer.layer][e] == DROPPED:
                row.append({"bits": DROPPED, "stored_bits": 0, "bytes": 0, "quantizer": None})
            elif all(q is None for q in parts):
                row.append({"bits": FLOAT, "stored_bits": 32, "bytes": 4 * layer.expert_parameters(), "quantizer": None})
            else:
                q = parts[0]
                group = fused.get((layer.layer, e))
                if group is None:
                    kernel = "com.microsoft.MatMulNBits"
                    nbytes = sum(_stored_bytes(graph, expert_weight_name(layer.layer, e, p), merged)
                                 for p in projections)
                else:
                    kernel, (prefix, size) = "com.microsoft.QMoE", group
                    nbytes = sum(_stored_bytes(graph, f"{prefix}.{fc}", merged) for fc in ("fc1", "fc2")) // size
                row.append({"bits": q.bits, "stored_bits": q.stored_bits, "kernel": kernel, "bytes": nbytes,
                            "quantizer": q.method})
                if parts[-1].bits != q.bits:  # the plan's down_bits
                    row[-1] |= {"down_bits": parts[-1].bits, "down_stored_bits": parts[-1].stored_bits}
            if expert_tokens:
                row[-1]["calibration_tokens"] = expert_tokens.get(expert_weight_name(layer.layer, e, "up"), 0)
            expert_bytes += row[-1]["bytes"]
            # a float expert counts at the 32 bits it is stored in; down_proj at its own width
            whole = row[-1]["stored_bits" if row[-1]["bits"] == FLOAT else "bits"]
            widths = [row[-1].get("down_bits", whole) if p == "down" else whole for p in projections]
            weighted_bits += sum(widths) * layer.expert_parameters() / len(projections)
        experts.append({"layer": layer.layer, "experts": row})
    non_expert = {name: {"bits": q.bits, "stored_bits": q.stored_bits, "bytes": _stored_bytes(graph, name, merged)}
                  for name, q in quantized.items() if not re.fullmatch(EXPERT_WEIGHT_PATTERN, name)}
    params = sum(layer.num_experts * layer.expert_parameters() for layer in layers)
    repacked = {q.bits: q.stored_bits for q in quantized.values() if q.stored_bits != q.bits}
    return {
        "method": plan["quantization"]["method"], "group_size": plan["quantization"]["group_size"],
        "grid": plan_grid(plan), "layer_prior_tokens": plan_layer_prior(plan),
        "kernels": {kernel: sum(x.get("kernel") == kernel for layer in experts for x in layer["experts"])
                    for kernel in ("com.microsoft.MatMulNBits", "com.microsoft.QMoE")},
        "widths_in_larger_containers": {str(b): repacked[b] for b in sorted(repacked)},
        "expert_bytes": expert_bytes, "avg_expert_bits": weighted_bits / params,
        "rtn_fallback_experts": [[layer["layer"], e] for layer in experts for e, x in enumerate(layer["experts"])
                                 if plan["quantization"]["method"] == "gptq" and x["quantizer"] == "rtn"],
        "predicted_expert_bytes": (plan.get("objective") or {}).get("predicted_expert_bytes"),
        "experts": experts, "non_expert": non_expert,
    }


def pruning_record(routing: dict) -> dict | None:
    """Which layers prune by which rule (beta or top_p), the importance the artifact uses, and its switch."""
    from moec.ops.moe import PRUNE_SWITCH
    from moec.policy import prunes

    pruned = {layer: change for layer, change in routing.items() if prunes(change)}
    if not pruned:
        return None
    return {"layers": [{"layer": layer, **{key: change[key] for key in ("beta", "top_p") if key in change}}
                       for layer, change in pruned.items()],
            "protect_fraction": next(iter(pruned.values()))["protect_fraction"],
            "importance": "L1 norm of the token's hidden state at the MoE input (proxy for the paper's "
                          "attention received x L1 norm)",
            "switch": f"input {PRUNE_SWITCH} (bool, default true); fed false, the artifact runs plain top-k"}


def _qmoe_experts(graph) -> dict[tuple[int, int], tuple[str, int]]:
    """(layer, expert) -> (initializer prefix, experts in the group) for the experts a QMoE node
    computes (passes/lower_moe.py lists each group's experts in `{prefix}.experts`)."""
    import re

    from moec.ops.moe import QMOE_GROUP_PATTERN

    groups = {}
    for name, value in graph.graph.initializers.items():
        match = re.fullmatch(QMOE_GROUP_PATTERN + r"\.experts", name)
        if match:
            ids = value.const_value.numpy().tolist()
            groups |= {(int(match["layer"]), e): (name.removesuffix(".experts"), len(ids)) for e in ids}
    return groups


def _stored_bytes(graph, name: str, merged: dict[str, tuple[str, int]]) -> int:
    """Bytes of the MatMulNBits initializers (packed codes, scales, zero points) of weight `name`;
    of a product merged with its siblings (`merged`, from _merged_products), its rows' share."""
    from moec.ops.moe import MERGED_ROWS

    initializers = graph.graph.initializers
    product, index = merged.get(name, (name, None))
    total = sum(initializers[f"{product}.{suffix}"].const_value.nbytes for suffix in ("q", "scales", "zero_points"))
    if index is None:
        return total
    rows = initializers[f"{product}{MERGED_ROWS}"].const_value.numpy().tolist()
    return total * rows[index] // sum(rows)


def _merged_products(graph) -> dict[str, tuple[str, int]]:
    """weight -> (the product it was merged into, its place there): passes/merge_sibling_products.py
    names a merged product's initializers `{a}+{b}+....q` and gives each part's rows in `....split`."""
    from moec.ops.moe import MERGED_JOIN, MERGED_ROWS

    bases = (name.removesuffix(MERGED_ROWS) for name in graph.graph.initializers if name.endswith(MERGED_ROWS))
    return {part: (base, index) for base in bases for index, part in enumerate(base.split(MERGED_JOIN))}
