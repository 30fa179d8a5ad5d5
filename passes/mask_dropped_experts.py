"""Keep each layer's router from selecting the experts the plan drops.

Matches: `moec::Experts` nodes whose `dropped` attribute lists experts, and, walking back from each
node's top_k_index through the integer values it is computed from, the router's selection: the
TopK whose indices it is, or the ArgMax (a router that picks one expert at a time, PhiMoE's
sparsemixer).
Produces: that selection reading its scores through Where(dropped, -inf, scores), so a token's
top-k comes from the remaining experts; whatever else the router computes from its scores is
unchanged (moec.experts.RoutingMask does the same in PyTorch, for the reference and calibration).
The experts lowering, which runs after, computes no dropped expert.
Requires: the router's selection to be found, over the experts on its last axis; a PassError
names the layer otherwise.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from moec.passes.lower_moe import is_moe_node, moe_spec

SELECTIONS = ("TopK", "ArgMax")
INTEGERS = frozenset((ir.DataType.INT64, ir.DataType.INT32))


def router_selections(node: ir.Node) -> list[ir.Node]:
    """The TopK and ArgMax nodes whose indices the Experts node's top_k_index is made of."""
    found, seen, frontier = [], set(), [node.inputs[1]]
    while frontier:
        value = frontier.pop()
        producer = value.producer()
        if producer is None or producer in seen:
            continue
        seen.add(producer)
        if producer.op_type in SELECTIONS and producer.domain == "" and value is producer.outputs[-1]:
            found.append(producer)
            continue
        frontier += [v for v in producer.inputs if v is not None and v.dtype in INTEGERS]
    return found


def _selects_along_last_axis(selection: ir.Node, num_experts: int) -> bool:
    scores = selection.inputs[0]
    axis = selection.attributes.get_int("axis", -1 if selection.op_type == "TopK" else 0)
    rank = None if scores.shape is None else len(scores.shape)
    return rank is not None and axis in (-1, rank - 1) and scores.shape[-1] == num_experts


class MaskDroppedExpertsPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in list(model.graph):
            if not is_moe_node(node) or not moe_spec(node).dropped:
                continue
            spec = moe_spec(node)
            num_experts = node.inputs[4].shape[0]
            selections = router_selections(node)
            if not selections or not all(_selects_along_last_axis(s, num_experts) for s in selections):
                raise ir.passes.PassError(f"layer {spec.layer}: its router's selection of experts (a TopK or "
                                          f"ArgMax over the {num_experts} experts) was not found, so moec cannot "
                                          "drop experts there")
            dropped = np.isin(np.arange(num_experts), spec.dropped)
            for selection in selections:
                scores = selection.inputs[0]
                tape = ir.tape.Tape()
                prefix = f"layers.{spec.layer}.dropped_experts/{selection.name}"
                mask = tape.op("Constant", [], {"value": ir.tensor(dropped)}, name=f"{prefix}/mask")
                floor = tape.op("Constant", [], {"value": ir.tensor(np.array(-np.inf, scores.dtype.numpy()))},
                                name=f"{prefix}/floor")
                masked = tape.op("Where", [mask, floor, scores], name=f"{prefix}/scores")
                for made in tape.nodes:
                    made.outputs[0].name = made.name
                masked.dtype, masked.shape = scores.dtype, scores.shape
                model.graph.insert_before(selection, tape.nodes)
                selection.replace_input_with(0, masked)
            modified = True
        return ir.passes.PassResult(model, modified)
