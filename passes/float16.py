"""Run the traced float32 graph with float16 activations and weights.

Matches: every float32 value of the traced graph (the exporter types them all): graph inputs and
outputs, node outputs, initializers, Constant and ConstantOfShape values, Cast(to=FLOAT).
Produces: the same computation in float16, except the routing and the loops: the nodes that
compute an Experts node's top_k_index and top_k_weights and nothing else (the family's router, from
its input on) stay in float32, fed through a Cast, so that near-tied routing decisions do not flip;
a node with a subgraph (the Scan of a linear-attention recurrence, or the If that chooses its form)
keeps its float32 body, reading float16 values of the graph around it through Casts, and the
state it carries from step to step (a graph input and output) stays float32 too, as does an
Identity that only such nodes read from (or nothing: the optimizer leaves one on a state). Initializers are
converted when they are written, one at a time. The routed experts' weights (the Experts node's
expert inputs) keep their stored dtype: the experts lowering casts each expert's slice to the
activations' dtype, and keeps the pruning and the sum over experts in float32 itself.
Requires: no MatMulNBits yet (it and the experts lowering take the activations' dtype from the graph).
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


def _cone(values) -> set[ir.Node]:
    """The nodes that the values are computed from."""
    nodes, stack = set(), [v.producer() for v in values if v is not None and v.producer() is not None]
    while stack:
        node = stack.pop()
        if node not in nodes:
            nodes.add(node)
            stack += [v.producer() for v in node.inputs if v is not None and v.producer() is not None]
    return nodes


def _routing_nodes(graph: ir.Graph) -> set[ir.Node]:
    """The nodes computing the Experts nodes' top_k_index and top_k_weights that their hidden
    input does not need: the routers."""
    routing = set()
    for node in graph:
        if is_moe_node(node):
            routing |= _cone(node.inputs[1:3]) - _cone(node.inputs[:1])
    return routing


def _loops(graph: ir.Graph) -> set[ir.Node]:
    """Nodes with a subgraph, which this pass does not enter."""
    return {node for node in graph
            if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values())}


class Float16Pass(ir.passes.InPlacePass):
    def requires(self, model: ir.Model) -> None:
        if any(node.op_type == "MatMulNBits" for node in ir.traversal.RecursiveGraphIterator(model.graph)):
            raise ir.passes.PreconditionError("Float16Pass runs before MatMulNBits (MatMulNBitsPass)")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        float32_nodes = _routing_nodes(graph) | _loops(graph)
        # what the loops' subgraphs read from around them counts as read in float32 too
        float32_readers = float32_nodes | {inner for node in _loops(graph) for inner, _, _ in _outer_uses(node)}
        # an Identity that only the loops read from, or nothing (the optimizer leaves one reading a state
        # input where an If nested in the delta rule's If read it), stays float32 with them
        while passing := {node for node in graph if node.op_type == "Identity" and node not in float32_nodes
                          and not node.outputs[0].is_graph_output()
                          and all(use.node in float32_readers for use in node.outputs[0].uses())}:
            float32_nodes |= passing
            float32_readers |= passing
        kept = _expert_weights(graph) | {value for value in graph.initializers.values()
                                         if value.uses() and all(use.node in float32_readers for use in value.uses())}
        modified = False
        for value in graph.initializers.values():
            if value.dtype == FLOAT and value not in kept:
                value.const_value = as_float16(value.const_value)
                value.dtype = FLOAT16
                modified = True
        state = {v for v in graph.inputs if v.uses() and all(use.node in float32_readers for use in v.uses())} | \
                {v for v in graph.outputs if v.producer() in float32_nodes}
        for value in [*graph.inputs, *graph.outputs]:
            if value.dtype == FLOAT and value not in state:
                value.dtype = FLOAT16
                modified = True
        for node in graph:
            if node in float32_nodes:
                continue
            for value in node.outputs:
                if value.dtype == FLOAT:
                    value.dtype = FLOAT16
                    modified = True
            modified |= _float16_attributes(node)
        for node in list(graph):
            if node in float32_nodes:
                _cast_at_the_border(graph, node, float32_nodes)
        return ir.passes.PassResult(model, modified)


def _outer_uses(node: ir.Node) -> list[tuple[ir.Node, int, ir.Value]]:
    """(inner node, input index, value) where a node's subgraphs read a value of the graph around
    them (the delta rule's If branches read the rule's inputs so)."""
    subgraphs = [a.value for a in node.attributes.values() if a.type == ir.AttributeType.GRAPH] + \
        [g for a in node.attributes.values() if a.type == ir.AttributeType.GRAPHS for g in a.value]
    inner = [n for g in subgraphs for n in ir.traversal.RecursiveGraphIterator(g)]
    made = {v for g in subgraphs for v in [*g.inputs, *g.initializers.values()]}
    for subgraph_node in inner:
        made.update(subgraph_node.outputs)
        for attribute in subgraph_node.attributes.values():  # a Scan's body inside an If branch
            if attribute.type == ir.AttributeType.GRAPH:
                made.update(attribute.value.inputs)
    return [(n, i, v) for n in inner for i, v in enumerate(n.inputs) if v is not None and v not in made]


def _cast_at_the_border(graph: ir.Graph, node: ir.Node, float32_nodes: set[ir.Node]) -> None:
    """A node kept in float32 reads float16 values, its subgraphs' reads of the graph around them
    included, through a Cast to float32 (and a float32 output read outside them, other than by the
    Experts node, is cast back)."""
    for i, value in enumerate(node.inputs):
        if value is not None and value.dtype == FLOAT16 and value.producer() not in float32_nodes:
            cast = ir.node("Cast", [value], attributes={"to": FLOAT}, name=f"{node.name}/to_float32_{i}")
            cast.outputs[0].dtype, cast.outputs[0].shape = FLOAT, value.shape
            graph.insert_before(node, cast)
            node.replace_input_with(i, cast.outputs[0])
    casts = {}
    for inner, i, value in _outer_uses(node):
        if value.dtype == FLOAT16 and value.producer() not in float32_nodes:
            if value not in casts:
                name = f"{node.name}/outer_to_float32_{len(casts)}"
                cast = ir.node("Cast", [value], attributes={"to": FLOAT}, name=name)
                cast.outputs[0].dtype, cast.outputs[0].shape, cast.outputs[0].name = FLOAT, value.shape, name
                graph.insert_before(node, cast)
                casts[value] = cast.outputs[0]
            inner.replace_input_with(i, casts[value])
    for i, value in enumerate(node.outputs):
        outside = [use for use in value.uses() if use.node not in float32_nodes and not is_moe_node(use.node)]
        if value.dtype == FLOAT and outside:
            cast = ir.node("Cast", [value], attributes={"to": FLOAT16}, name=f"{node.name}/to_float16_{i}")
            cast.outputs[0].dtype, cast.outputs[0].shape = FLOAT16, value.shape
            graph.insert_after(node, cast)
            for use in outside:
                use.node.replace_input_with(use.idx, cast.outputs[0])


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
