"""Set each layer's routing changes from the plan on its Experts node.

Matches: `moec::Experts` nodes of the layers in `routing` ({layer: {attribute: value}}, from
moec.policy.layer_routing: `beta`, `top_p`, `protect_fraction`, `keep_experts`, `dropped`).
Produces: the same nodes with those attributes set. The experts lowering turns pruning into the
layer's moec.DynamicGating, so a dropped (token, expert) pair costs no expert compute, and
computes no dropped expert; MaskDroppedExpertsPass keeps the router from selecting them. Layers
not listed keep plain top-k routing.
Requires: an Experts node for every layer it names (the lowering, which consumes them, runs after).
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from moec.ops.moe import ExpertsSpec
from moec.passes.lower_moe import is_moe_node, moe_spec


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
        modified = False
        for node in model.graph:
            spec = moe_spec(node) if is_moe_node(node) else None
            if spec is None or spec.layer not in self.routing:
                continue
            changed = dataclasses.replace(spec, **self.routing[spec.layer]).attributes()
            for field in dataclasses.fields(ExpertsSpec):
                if field.name in self.routing[spec.layer]:
                    node.attributes[field.name] = ir.Attr(field.name, _ATTR_TYPES[field.type], changed[field.name])
            modified = True
        return ir.passes.PassResult(model, modified)


_ATTR_TYPES = {"float": ir.AttributeType.FLOAT, "tuple[int, ...]": ir.AttributeType.INTS}
