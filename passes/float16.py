"""Run the traced float32 graph with float16 activations and weights.

Matches: every float32 value of the traced graph (the exporter types them all): graph inputs and
outputs, node outputs, initializers, Constant and ConstantOfShape values, Cast(to=FLOAT).
Produces: the same computation in float16. Initializers are converted when they are written, one at
a time. The routed experts' weights (the MoE node's expert inputs) keep their stored dtype: the MoE
lowering casts each expert's slice to the activations' dtype, and keeps the routing and the sum over
experts in float32 itself.
Run it before the MoE lowering and MatMulNBits, which take the activation dtype from the graph.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from moec.ops.moe import EXPERT_INPUTS, INPUT_NAMES
from moec.passes.lower_moe import is_moe_node

FLOAT, FLOAT16 = ir.DataType.FLOAT, ir.DataType.FLOAT16


def float16(array: np.ndarray) -> np.ndarray:
    """Values beyond float16's range saturate (a float32 mask's finfo.min becomes float16's, as
    transformers masks in float16)."""
    limit = np.finfo(np.float16).max
    return np.clip(array, -limit, limit).astype(np.float16)


def as_float16(tensor: ir.TensorProtocol) -> ir.LazyTensor:
    """`tensor` in float16, computed when read."""
    return ir.LazyTensor(lambda: ir.tensor(float16(tensor.numpy())), dtype=FLOAT16, shape=tensor.shape,
                         name=tensor.name)


def _expert_weights(graph: ir.Graph) -> set[ir.Value]:
    """Initializers read only as MoE expert weights (they keep their dtype)."""
    expert_indices = {i for i, name in enumerate(INPUT_NAMES) if name in EXPERT_INPUTS}

    def expert_use(use) -> bool:
        return is_moe_node(use.node) and use.idx in expert_indices

    return {value for value in graph.initializers.values()
            if value.uses() and all(expert_use(use) for use in value.uses())}


class Float16Pass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        kept = _expert_weights(graph)
        modified = False
        for value in graph.initializers.values():
            if value.dtype == FLOAT and value not in kept:
                value.const_value = as_float16(value.const_value)
                value.dtype = FLOAT16
                modified = True
        for value in [*graph.inputs, *graph.outputs]:
            if value.dtype == FLOAT:
                value.dtype = FLOAT16
                modified = True
        for node in graph:
            for value in node.outputs:
                if value.dtype == FLOAT:
                    value.dtype = FLOAT16
                    modified = True
            modified |= _float16_attributes(node)
        return ir.passes.PassResult(model, modified)


def _float16_attributes(node: ir.Node) -> bool:
    """Cast(to=FLOAT) → FLOAT16; float32 Constant / ConstantOfShape values (a ConstantOfShape
    without one makes float32 zeros) → float16."""
    if node.domain != "":
        return False
    if node.op_type == "Cast" and node.attributes["to"].value == FLOAT:
        node.attributes["to"] = ir.AttrInt64("to", FLOAT16)
        return True
    if node.op_type == "ConstantOfShape" and "value" not in node.attributes:  # its default is float32 zero
        node.attributes["value"] = ir.AttrTensor("value", ir.tensor(np.zeros(1, np.float16)))
        return True
    if node.op_type == "Constant" and "value_float" in node.attributes:
        value = node.attributes.pop("value_float").value
        node.attributes["value"] = ir.AttrTensor("value", ir.tensor(float16(np.array(value))))
        return True
    name = {"Constant": "value", "ConstantOfShape": "value"}.get(node.op_type)
    attribute = node.attributes.get(name) if name else None
    if attribute is not None and attribute.type == ir.AttributeType.TENSOR and attribute.value.dtype == FLOAT:
        node.attributes[name] = ir.AttrTensor(name, ir.tensor(float16(attribute.value.numpy())))
        return True
    return False
