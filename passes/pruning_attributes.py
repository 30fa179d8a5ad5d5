"""Set each pruned layer's dynamic-pruning parameters on its Experts node, from the plan.

Matches: `moec::Experts` nodes of the layers in `pruning` ({layer: (beta, protect_fraction)}).
Produces: the same nodes with their `beta` and `protect_fraction` attributes set; the experts
lowering turns them into the layer's moec.DynamicGating, so a dropped (token, expert) pair
costs no expert compute. Layers not listed keep plain top-k routing (beta 0).
Requires: an Experts node for every layer it prunes (the lowering, which consumes them, runs after).
"""

from __future__ import annotations

import onnx_ir as ir

from moec.passes.lower_moe import is_moe_node, moe_spec


class PruningAttributesPass(ir.passes.InPlacePass):
    def __init__(self, pruning: dict[int, tuple[float, float]]):
        super().__init__()
        self.pruning = pruning

    def requires(self, model: ir.Model) -> None:
        missing = set(self.pruning) - {moe_spec(node).layer for node in model.graph if is_moe_node(node)}
        if missing:
            raise ir.passes.PreconditionError(f"layers {sorted(missing)} have no Experts node to prune "
                                              "(PruningAttributesPass runs before the experts lowering)")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in model.graph:
            layer = moe_spec(node).layer if is_moe_node(node) else None
            if layer not in self.pruning:
                continue
            beta, protect_fraction = self.pruning[layer]
            node.attributes["beta"] = ir.AttrFloat32("beta", beta)
            node.attributes["protect_fraction"] = ir.AttrFloat32("protect_fraction", protect_fraction)
            modified = True
        return ir.passes.PassResult(model, modified)
