"""Give the graph a `logits_to_keep` input, as transformers' forward has: only the last N positions
reach the head.

Matches: the MatMul or MatMulNBits that makes the graph output `logits` out of [batch, positions,
hidden] states, possibly through nodes of one non-constant input (a softcap, a scale, a Cast).
Produces: a Slice of those states along the positions, from -logits_to_keep to the end, and the
graph input LOGITS_TO_KEEP (int64 scalar, an initializer giving its default 0: every position, so
a caller that does not feed it sees no change). Generation feeds 1: a 128-token prompt otherwise
multiplies 128 rows by the vocabulary-sized head and keeps one of them.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from moec.ops.moe import LOGITS_TO_KEEP

HEADS = ("MatMul", "MatMulNBits")


def _head(graph: ir.Graph) -> tuple[ir.Node | None, list[ir.Value]]:
    """The projection the logits come from, walking back through single-input nodes, and the values
    on the way (the logits first)."""
    value = next((v for v in graph.outputs if v.name == "logits"), None)
    path = []
    while value is not None and (node := value.producer()) is not None:
        path.append(value)
        if node.op_type in HEADS and node.domain in ("", "com.microsoft"):
            states = node.inputs[0]
            return (node, path) if states.shape is not None and states.shape.rank() == 3 else (None, [])
        varying = [v for v in node.inputs if v is not None and ir.convenience.get_const_tensor(v) is None]
        value = varying[0] if len(varying) == 1 else None
    return None, []


class LogitsToKeepPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        head, path = _head(graph)
        if head is None or any(v.name == LOGITS_TO_KEEP for v in graph.inputs):
            return ir.passes.PassResult(model, modified=False)
        keep = ir.Value(name=LOGITS_TO_KEEP, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([]),
                        const_value=ir.tensor(np.array(0, np.int64), name=LOGITS_TO_KEEP))
        graph.inputs.append(keep)
        graph.register_initializer(keep)
        tape = ir.tape.Tape()

        def const(name, array):
            return tape.initializer(ir.tensor(np.array(array, np.int64), name=f"logits_to_keep/{name}"))

        start = tape.op("Neg", [tape.op("Reshape", [keep, const("one", [1])])])
        states = tape.op("Slice", [head.inputs[0], start, const("end", [np.iinfo(np.int64).max]), const("axis", [1])])
        states.dtype = head.inputs[0].dtype
        states.shape = ir.Shape([head.inputs[0].shape[0], "kept_positions", head.inputs[0].shape[2]])
        for node in tape.nodes:  # named: onnx-ir would name them val_N, as it names an If branch's values
            node.name = node.outputs[0].name = f"logits_to_keep/{node.op_type}"
        graph.insert_before(head, tape.nodes)
        for value in tape.initializers:
            graph.register_initializer(value)
        head.replace_input_with(0, states)
        for value in path:  # as many positions as kept, no longer the input's
            if value.shape is not None and value.shape.rank() == 3:
                value.shape = ir.Shape([value.shape[0], "kept_positions", value.shape[2]])
        return ir.passes.PassResult(model, modified=True)
