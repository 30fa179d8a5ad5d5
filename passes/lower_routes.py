"""Lower each `moec::Routes` node: the pruning of a layer whose experts module routes for itself.

Matches: every node of domain `moec`, type `Routes` (see moec.ops.routes for its semantics).
Produces, in its place: in a layer that prunes (beta > 0 or top_p < 1), one moec.DynamicGating
call on the module's routing, as the experts lowering makes one (it reads the graph input
`prune_experts`), whose kept weights the module gets, with each route it drops naming expert E (no
expert); the layer's Experts nodes get `sentinel`, so that none computes those routes. A layer that
does not prune gets its routing through unchanged, and its node is removed.
Requires: the Experts nodes still unlowered (LowerMoEPass runs after).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from moec.ops import routes
from moec.passes.lower_moe import Builder, add_gating_function, dynamic_gating, is_moe_node, moe_spec


def is_routes_node(node: ir.Node) -> bool:
    return node.domain == routes.DOMAIN and node.op_type == routes.OP_TYPE


def routes_spec(node: ir.Node) -> routes.RoutesSpec:
    return routes.RoutesSpec.from_attributes({name: attr.value for name, attr in node.attributes.items()})


class LowerRoutesPass(ir.passes.InPlacePass):
    def requires(self, model: ir.Model) -> None:
        layers = {routes_spec(node).layer for node in model.graph if is_routes_node(node)}
        if layers - {moe_spec(node).layer for node in model.graph if is_moe_node(node)}:
            raise ir.passes.PreconditionError("LowerRoutesPass runs before the experts lowering (LowerMoEPass)")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        nodes = [node for node in model.graph if is_routes_node(node)]
        pruned = set()
        for node in nodes:
            spec = routes_spec(node)
            if spec.prunes:
                _lower_pruning(model, node, spec)
                pruned.add(spec.layer)
            else:
                ir.convenience.replace_all_uses_with(node.outputs, node.inputs[1:])
                model.graph.remove(node, safe=True)
        for node in model.graph:
            if is_moe_node(node) and moe_spec(node).layer in pruned:
                node.attributes["sentinel"] = ir.AttrInt64("sentinel", 1)
        add_gating_function(model)
        return ir.passes.PassResult(model, modified=bool(nodes))


def _lower_pruning(model: ir.Model, node: ir.Node, spec: routes.RoutesSpec) -> None:
    hidden, index, weights = node.inputs
    hidden_size = hidden.shape[-1] if hidden.shape is not None else None
    if not isinstance(hidden_size, int):
        raise ValueError(f"layer {spec.layer}'s Routes node needs a static hidden size, got {hidden.shape}")
    b = Builder(model.graph, f"layers.{spec.layer}.routes")
    float32 = ir.DataType.FLOAT
    hidden32 = hidden if hidden.dtype == float32 else b.op("Cast", hidden, to=float32)
    kept, keep = dynamic_gating(b, model, hidden32, b.op("Cast", weights, to=float32), index, spec, spec.num_experts,
                                hidden_size)
    new_index = b.op("Where", keep, index, b.const(np.array(spec.num_experts, np.int64)))
    new_weights = kept if weights.dtype == float32 else b.op("Cast", kept, to=weights.dtype)
    for new, old in zip((new_index, new_weights), node.outputs):
        new.type, new.shape = old.type, old.shape
    ir.convenience.replace_nodes_and_values(model.graph, node, [node], b.tape.nodes, node.outputs,
                                            [new_index, new_weights])
