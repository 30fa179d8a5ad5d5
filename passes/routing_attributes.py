"""Set each layer's routing changes from the plan on its Experts node, or its Routes node.

Matches: `moec::Experts` nodes of the layers in `routing` ({layer: {attribute: value}}, from
moec.policy.layer_routing: `beta`, `top_p`, `protect_fraction`, `keep_experts`, `dropped`), and
`moec::Routes` nodes of those layers (an experts module that routes for itself: moec.ops.routes).
Produces: the same nodes with those attributes set: the pruning on the layer's Routes node where it
has one, everything else on its Experts nodes. The lowerings turn pruning into the layer's
moec.DynamicGating, so a dropped (token, expert) pair costs no expert compute, and compute no
dropped expert; MaskDroppedExpertsPass keeps the router from selecting them. Layers not listed
keep plain top-k routing.
Requires: an Experts node for every layer it names (the lowerings, which consume them, run after).
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from moec.ops import routes
from moec.passes.lower_moe import is_moe_node, moe_spec
from moec.passes.lower_routes import is_routes_node, routes_spec


class RoutingAttributesPass(ir.passes.InPlacePass):
    def __init__(self, routing: dict[int, dict]):
        super().__init__()
        self.routing = routing

    def requires(self, model: ir.Model) -> None:
        missing = set(self.routing) - {moe_spec(node).layer for node in model.graph if is_moe_node(node)}
        if missing:
            raise ir.passes.PreconditionError(f"layers {sorted(missing)} have no Experts node to route "
                                              "(RoutingAttributesPass runs before the experts lowering)")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        own_routes = {routes_spec(node).layer for node in model.graph if is_routes_node(node)}
        modified = False
        for node in model.graph:
            if is_moe_node(node):
                spec = moe_spec(node)
                moved = routes.PRUNING_FIELDS if spec.layer in own_routes else frozenset()
                change = {k: v for k, v in self.routing.get(spec.layer, {}).items() if k not in moved}
            elif is_routes_node(node):
                spec = routes_spec(node)
                change = {k: v for k, v in self.routing.get(spec.layer, {}).items() if k in routes.PRUNING_FIELDS}
            else:
                continue
            if change:
                _set(node, dataclasses.replace(spec, **change), change)
                modified = True
        return ir.passes.PassResult(model, modified)


def _set(node: ir.Node, spec, names) -> None:
    values = spec.attributes()
    for field in dataclasses.fields(spec):
        if field.name in names:
            node.attributes[field.name] = ir.Attr(field.name, _ATTR_TYPES[field.type], values[field.name])


_ATTR_TYPES = {"float": ir.AttributeType.FLOAT, "tuple[int, ...]": ir.AttributeType.INTS}
