"""Keep each layer's router from selecting the experts the plan drops.

Matches: `moec::Experts` nodes whose `dropped` attribute lists experts, and, walking back from each
node's top_k_index through the integer values it is computed from, the router's selection: the
TopK whose indices it is, or the ArgMax (a router that picks one expert at a time, PhiMoE's
sparsemixer).
Produces: that selection reading its scores through Where(dropped, -inf, scores) (the experts
are the first positions of the scores' last axis, which may hold more options), so a token's
top-k comes from the remaining experts; whatever else the router computes from its scores is
unchanged (moec.experts.RoutingMask does the same in PyTorch, for the reference and calibration).
The experts lowering, which runs after, computes no dropped expert.
Requires: the router's selection to be found, over the experts on its last axis; a MoecError
names the layer otherwise.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from moec.errors import MoecError
from moec.passes.lower_moe import is_moe_node, moe_inputs, moe_spec

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
    """Over the experts on the last axis (a router may score more options than experts, Zaya's
    "no expert": the experts are the first `num_experts`)."""
    scores = selection.inputs[0]
    axis = selection.attributes.get_int("axis", -1 if selection.op_type == "TopK" else 0)
    rank = None if scores.shape is None else len(scores.shape)
    width = None if rank is None else scores.shape[-1]
    return rank is not None and axis in (-1, rank - 1) and isinstance(width, int) and width >= num_experts


class MaskDroppedExpertsPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in list(model.graph):
            spec = moe_spec(node) if is_moe_node(node) else None
            if spec is None or not spec.dropped:
                continue
            num_experts = moe_inputs(node)["down"].shape[0]
            selections = router_selections(node)
            if not selections or not all(_selects_along_last_axis(s, num_experts) for s in selections):
                raise MoecError(f"layer {spec.layer}: its router's selection of experts (a TopK or ArgMax over "
                                f"the {num_experts} experts) was not found, so moec cannot drop experts there")
            for selection in selections:
                scores = selection.inputs[0]
                dropped = np.isin(np.arange(scores.shape[-1]), spec.dropped)
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
