"""Which weight gets which width, and what each layer's routing does (pruning, super experts, dropped
experts): the plan, plus the functions here that read it (llama.cpp's way: the policy in one
readable place).

`quantization_specs` maps the plan, the traced graph's weights and the target to each weight's
quantization spec before any pass runs; MatMulNBitsPass, the build record, the verification
reference and GPTQ all read that map (or `weight_bits`, which it is made of).

Weights are known by name: routed experts as `layers.{l}.experts.{e}.{gate,up,down}_proj` (the
experts lowering's names), everything else by torch module path (passes/name_weights.py).
Routing (what a MoE block holds besides its experts and shared experts; in a block that is its
whole decoder layer, as Gemma 4's, just its router) and anything not listed stays in float.
"""

from __future__ import annotations

import re

from moec.errors import MoecError
from moec.ops.moe import EXPERT_WEIGHT_PATTERN, expert_weight_name
from moec.planner.plan import expert_widths, plan_grid
from moec.planner.sizes import DROPPED, FLOAT


def weight_category(name: str, moe_blocks: list[str] = ()) -> str | None:
    """The plan's non-expert category of a weight name, or None for weights kept in float.
    `moe_blocks` are the MoE blocks' module paths."""
    block = next((path for path in moe_blocks if name.startswith(path + ".")), None)
    # a block that is its decoder layer (Gemma 4 keeps its experts and router beside attention and a
    # dense MLP) holds more than routing: only its router is
    if block is not None and not re.search(r"(?:^|\.)layers\.\d+$", block):
        # a shared expert's own gate (Qwen2-MoE's shared_expert_gate) is routing too
        child = name[len(block) + 1:].split(".")[0]
        return "shared_expert" if child.startswith("shared") and not child.endswith("gate") else None
    if "router" in name:
        return None
    if name.startswith("lm_head"):
        return "lm_head"
    if "embed_tokens" in name:
        return "embedding"
    if ".self_attn." in name:
        return "attention"
    if name.startswith("model.layers."):
        return "dense_mlp"
    return None


def weight_bits(plan: dict, name: str, moe_blocks: list[str] = ()) -> int | None:
    """The width the plan gives weight `name`; None keeps it in float (or drops it: width 0, a
    dropped expert has no weights)."""
    expert = re.fullmatch(EXPERT_WEIGHT_PATTERN, name)
    if expert:
        layer = int(expert["layer"])
        whole, down = (None, None) if plan["experts"]["bits"][layer] is None else \
            expert_widths(plan, layer, int(expert["expert"]))
        bits = down if expert["proj"] == "down" else whole
    else:
        category = weight_category(name, moe_blocks)
        bits = None if category is None else plan["non_expert"].get(category)
    return None if bits is None or bits == FLOAT or bits == DROPPED else int(bits)


def layer_routing(plan: dict | None) -> dict[int, dict]:
    """What the plan changes in each layer's routing, as moec::Experts attribute values: the dynamic
    pruning (`beta` or `top_p`, `protect_fraction`), the super experts pruning never drops
    (`keep_experts`) and the experts it drops (`dropped`: width 0). Layers it leaves alone are absent."""
    if plan is None:
        return {}
    routing: dict[int, dict] = {}
    pruning = plan.get("pruning") or {}
    for entry in pruning.get("layers", []):
        rule = {key: float(entry[key]) for key in ("beta", "top_p") if key in entry}
        routing[int(entry["layer"])] = {**rule, "protect_fraction": float(pruning.get("protect_fraction", 0.0))}
    for layer, expert in plan.get("super_experts", []):
        row = routing.setdefault(layer, {})
        row["keep_experts"] = (*row.get("keep_experts", ()), expert)
    for layer, row in enumerate(plan["experts"]["bits"]):
        dropped = tuple(e for e, bits in enumerate(row or []) if bits == DROPPED)
        if dropped:
            routing.setdefault(layer, {})["dropped"] = dropped
    return dict(sorted(routing.items()))


def check_plan_fits(plan: dict, layers, num_layers: int) -> None:
    """The plan must have one row per layer: experts' widths for sparse layers, null for dense ones."""
    rows = plan["experts"]["bits"]
    if len(rows) != num_layers:
        raise MoecError(f"plan.json: experts.bits has {len(rows)} layers, the model has {num_layers}")
    sparse = {layer.layer: layer.num_experts for layer in layers}
    for layer, row in enumerate(rows):
        if layer in sparse and (row is None or len(row) != sparse[layer]):
            raise MoecError(f"plan.json: experts.bits[{layer}] must list {sparse[layer]} widths "
                            f"(layer {layer} is a MoE layer), got {row!r}")
        if layer not in sparse and row is not None:
            raise MoecError(f"plan.json: experts.bits[{layer}] must be null (layer {layer} has no experts)")


def prunes(change: dict) -> bool:
    """Whether a layer's routing change (layer_routing) prunes dynamically."""
    return "beta" in change or "top_p" in change


def check_routing_fits(routing: dict, layers) -> None:
    """Only sparse layers with more than one routed expert per token can prune; a super expert must
    be one of its layer's experts; a layer keeps at least its top-k experts."""
    sparse = {layer.layer: layer for layer in layers}
    for number, change in routing.items():
        layer = sparse.get(number)
        if layer is None:
            section = "pruning.layers" if prunes(change) else "super_experts"
            raise MoecError(f"plan.json: {section} names layer {number}, which has no routed experts")
        if prunes(change) and layer.top_k < 2:
            raise MoecError(f"plan.json: pruning.layers names layer {number}, which routes each token to one "
                            "expert: there is nothing to prune")
        outside = [e for e in change.get("keep_experts", ()) if not 0 <= e < layer.num_experts]
        if outside:
            raise MoecError(f"plan.json: super_experts names expert {outside[0]} of layer {number}, which has "
                            f"{layer.num_experts} experts")
        if layer.num_experts - len(change.get("dropped", ())) < layer.top_k:
            raise MoecError(f"plan.json: layer {number} drops {len(change['dropped'])} of its {layer.num_experts} "
                            f"experts, leaving fewer than the {layer.top_k} each token is routed to")


def product_weights(model, embedding_group: int | None = None) -> list[str]:
    """The weights a plan can quantize in a traced model (onnx-ir): every constant weight of a
    MatMul or Gemm, each routed expert's projections by the name the experts lowering gives them,
    and with `embedding_group` (a target that lowers tables to GatherBlockQuantized, and the plan's
    group size) each table a Gather reads whose rows hold whole groups. A MatMul weight that is a
    checkpoint tensor as stored (STORED_AS_IS: the product's [K, N] operand, not an
    nn.Linear's [N, K] weight transposed; Inkling's bare relative-logit bank) stays float: the
    quantizers group a checkpoint tensor along its rows, here the wrong axis."""
    from moec.passes.gather_block_quantized import embedding_weight
    from moec.passes.lower_moe import is_moe_node, moe_spec
    from moec.passes.matmul_nbits import product_weight
    from moec.passes.transpose_weights import STORED_AS_IS

    names = []
    for node in model.graph:
        if is_moe_node(node):
            spec = moe_spec(node)
            names += [expert_weight_name(spec.layer, e, p) for e in range(node.inputs[3].shape[0])
                      for p in spec.projections]
        elif (product := product_weight(node)) is not None:
            if not (product[1] and node.inputs[1].meta.get(STORED_AS_IS)):
                names.append(node.inputs[1].name)
        elif embedding_group and (table := embedding_weight(node)) is not None and \
                not table.shape[1] % embedding_group and node.inputs[0].name not in names:
            names.append(node.inputs[0].name)
    return names


def quantization_specs(plan: dict | None, weights: list[str], moe_blocks: list[str], target,
                       prequantized: dict | None = None) -> dict:
    """Each weight's moec.quant.Quantizer: the plan's width, stored in the target's container for it,
    the calibrated result where `prequantized` has the weight, else RTN on the plan's grid (with
    uniform importance). Weights the plan keeps in float are absent. `moe_blocks` are the MoE
    blocks' module paths (their routers stay in float)."""
    from moec.quant import Quantizer

    if plan is None:
        return {}
    group_size, grid = plan["quantization"]["group_size"], plan_grid(plan)
    specs = {}
    for name in weights:
        bits = weight_bits(plan, name, moe_blocks)
        if bits is not None:
            result = (prequantized or {}).get(name)
            specs[name] = Quantizer(bits, group_size, target.container_bits[bits],
                                    "rtn" if result is None else result.method, result, grid)
    return specs
