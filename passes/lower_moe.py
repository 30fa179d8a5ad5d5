"""Lower each `moec::MoE` node to standard ONNX ops that compute only the routed experts.

Matches: every node of domain `moec`, type `MoE` (see moec.ops.moe for its semantics).
Produces, in its place:
  - the routing and its dynamic pruning as one moec.DynamicGating call (an ONNX function added
    to the model) giving weights, indices and keep [T, k]; a layer the plan prunes (beta > 0)
    reads the graph input `prune_experts` (bool, default true), so pruning can be switched off at run time;
  - a graph output `expert_activations.{layer}`: the (token, expert) pairs the layer computed;
  - per expert e: the tokens routed to and kept by e (NonZero on its column of the routing mask), their
    hidden rows gathered, gate/up/down MatMuls on just those rows with expert e's own
    initializers (`expert_weight_name`: `layers.{l}.experts.{e}.{gate,up,down}_proj`, [in, out]), scaled by the
    routing weight and scatter-added into the output.
No token runs an expert it was not routed to and no weight is gathered per token.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from moec.ops.dynamic_gating import OP_TYPE as GATING_OP_TYPE
from moec.ops.dynamic_gating import SHARED_OP_TYPE, ROUTING_ATTRIBUTES, function_protos
from moec.ops.moe import (ACTIVATIONS_OUTPUT, DOMAIN, INPUT_NAMES, OP_TYPE, PRUNE_SWITCH, MoESpec,
                          expert_weight_name)


def is_moe_node(node: ir.Node) -> bool:
    return node.domain == DOMAIN and node.op_type == OP_TYPE


def moe_spec(node: ir.Node) -> MoESpec:
    return MoESpec.from_attributes({name: attr.value for name, attr in node.attributes.items()})


def moe_inputs(node: ir.Node) -> dict[str, ir.Value | None]:
    inputs = list(node.inputs) + [None] * (len(INPUT_NAMES) - len(node.inputs))
    return dict(zip(INPUT_NAMES, inputs))


def const_tensor(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The tensor of an initializer/constant input, None for an absent optional input."""
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is None:
        raise ValueError(f"MoE input {value.name!r} must be a constant (initializer)")
    return tensor


def expert_slice(stacked: ir.TensorProtocol, expert: int, transpose: bool, dtype: ir.DataType) -> ir.LazyTensor:
    """stacked[expert] (transposed if asked) in `dtype`, computed only when read: the expert weights
    of a whole model never sit in memory together, nor one layer's in a wider dtype than stored."""
    dims = list(stacked.shape)[1:]
    shape = ir.Shape(dims[::-1] if transpose else dims)

    def read():  # a transpose stays a view: MatMulNBits reads it back as [out, in], the writer copies it once
        array = stacked.numpy()[expert].astype(dtype.numpy(), copy=False)
        return ir.tensor(array.T if transpose else array)

    return ir.LazyTensor(read, dtype=dtype, shape=shape)


class _Builder:
    """A tape with constant helpers; nodes are named under `prefix`."""

    def __init__(self, graph: ir.Graph, prefix: str):
        self.tape = ir.tape.Tape(graph)
        self.prefix = prefix
        self.count = 0

    def op(self, op_type, *inputs, name=None, **attrs):
        return self.op_multi(op_type, *inputs, num_outputs=1, name=name, **attrs)[0]

    def op_multi(self, op_type, *inputs, num_outputs, name=None, domain="", overload="", **attrs):
        """Nodes and their outputs are named uniquely (`prefix/op_n`, `:i` for the i-th output): an
        If subgraph shares one namespace with the graph around it."""
        self.count += 1
        node_name = f"{self.prefix}/{name or op_type}_{self.count}"
        outputs = self.tape.op_multi_out(op_type, list(inputs), attrs or None, num_outputs=num_outputs,
                                         domain=domain, overload=overload, name=node_name)
        for i, value in enumerate(outputs):
            value.name = node_name if num_outputs == 1 else f"{node_name}:{i}"
        return outputs

    def const(self, array, name=None):
        return self.op("Constant", value=ir.tensor(np.asarray(array)), name=name or "Constant")

    def weight(self, tensor: ir.TensorProtocol, name: str) -> ir.Value:
        tensor.name = name
        return self.tape.initializer(tensor, name=name)


def _gating(b: _Builder, model: ir.Model, hidden: ir.Value, logits: ir.Value, score_bias: ir.Value | None,
            spec: MoESpec, num_experts: int, hidden_size: int):
    """A moec.DynamicGating call for the layer's routing and pruning: (weights, indices, keep) [T, k].
    Importance is the L1 norm of each token's hidden state (as a MatMul with ones: onnxruntime's
    reductions return wrong shapes for zero tokens). A pruned layer reads the graph's run-time
    switch PRUNE_SWITCH; an unpruned one (beta 0) is the plain routing."""
    ones = b.const(np.ones((hidden_size, 1), np.float32))
    importance = b.op("Squeeze", b.op("MatMul", b.op("Abs", hidden), ones), b.const(np.array([1], np.int64)))
    enabled = _prune_switch(model.graph) if spec.beta > 0 else b.const(np.array(True))
    inputs = [logits]
    if spec.scoring == "sigmoid":
        inputs.append(score_bias if score_bias is not None else b.const(np.zeros(num_experts, np.float32)))
    inputs += [importance, enabled]
    attributes = {name: value for name, value in spec.attributes().items()
                  if name in (*ROUTING_ATTRIBUTES, "beta", "protect_fraction")}
    return b.op_multi(GATING_OP_TYPE, *inputs, num_outputs=3, domain=DOMAIN, overload=spec.scoring, **attributes)


def _prune_switch(graph: ir.Graph) -> ir.Value:
    """The graph input PRUNE_SWITCH (bool scalar) with an initializer giving its default, true,
    created on first use: callers that do not feed it get pruning. (onnxruntime folds an
    initializer as a constant before SessionOptions.add_initializer can override it, so the
    switch must be an input.)"""
    for value in graph.inputs:
        if value.name == PRUNE_SWITCH:
            return value
    switch = ir.Value(name=PRUNE_SWITCH, type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape([]),
                      const_value=ir.tensor(np.array(True), name=PRUNE_SWITCH))
    graph.inputs.append(switch)
    graph.register_initializer(switch)
    return switch


def _expert(b: _Builder, x: ir.Value, stacked: dict[str, ir.TensorProtocol | None], spec: MoESpec,
            expert: int, dtype: ir.DataType):
    """gate/up/down on the expert's tokens x [n, H] of `dtype`; stacked weights [E, out, in], biases [E, out]."""
    def linear(inp, proj):
        name = expert_weight_name(spec.layer, expert, proj)
        weight = expert_slice(stacked[proj], expert, transpose=True, dtype=dtype)
        y = b.op("MatMul", inp, b.weight(weight, name), name=f"{proj}_proj")
        bias = stacked[f"{proj}_bias"]
        return y if bias is None else b.op("Add", y, b.weight(expert_slice(bias, expert, False, dtype), f"{name}.bias"))

    gate, up = linear(x, "gate"), linear(x, "up")
    if spec.activation == "silu":
        hidden = b.op("Mul", b.op("Mul", gate, b.op("Sigmoid", gate)), up)
    else:
        limit = spec.swiglu_limit
        gate = b.op("Clip", gate, None, b.const(np.float32(limit)))
        up = b.op("Clip", up, b.const(np.float32(-limit)), b.const(np.float32(limit)))
        glu = b.op("Mul", gate, b.op("Sigmoid", b.op("Mul", gate, b.const(np.float32(spec.swiglu_alpha)))))
        hidden = b.op("Mul", b.op("Add", up, b.const(np.float32(1.0))), glu)
    return linear(hidden, "down")


def _routed_experts(b: _Builder, out: ir.Value, experts: range, hidden: ir.Value, routed: ir.Value,
                    dense_weights: ir.Value, stacked: dict, spec: MoESpec) -> ir.Value:
    """`out` plus each expert's weighted output on the tokens routed to and kept by it."""
    last_axis = b.const(np.array([-1], np.int64))
    for e in experts:
        b.prefix = f"layers.{spec.layer}.experts.{e}"
        index = b.const(np.array(e, np.int64))
        tokens = b.op("Reshape", b.op("NonZero", b.op("Gather", routed, index, axis=0)), last_axis)
        x = b.op("Gather", hidden, tokens, axis=0)
        y = _expert(b, x, stacked, spec, e, hidden.dtype or ir.DataType.FLOAT)
        token_weights = b.op("Unsqueeze", b.op("Gather", b.op("Gather", dense_weights, index, axis=0),
                                               tokens, axis=0), last_axis)
        out = b.op("ScatterND", out, b.op("Unsqueeze", tokens, last_axis),
                   b.op("Mul", y, token_weights), reduction="add")
    return out


def _routed_experts_subgraph(b: _Builder, graph: ir.Graph, out: ir.Value, experts: range, hidden: ir.Value, routed: ir.Value,
                             dense_weights: ir.Value, stacked: dict, spec: MoESpec) -> ir.Value:
    """The same, as the then-branch of an If that runs only when some token is routed to one of
    these experts. Why: onnxruntime's session creation grows about quadratically with the nodes
    of one graph (128 experts x 8 layers: 46 s flat, 8 s with a subgraph per layer), while a
    subgraph is planned on its own."""
    inner = _Builder(None, b.prefix)
    inner.count = b.count
    result = _routed_experts(inner, out, experts, hidden, routed, dense_weights, stacked, spec)
    b.count, b.prefix = inner.count, f"layers.{spec.layer}.experts.{experts.start}-{experts.stop - 1}"
    for value in inner.tape.initializers:  # weights live in the main graph, where they are written and packed
        graph.register_initializer(value)
    passed = ir.Value(name=None)
    for value in (result, passed):  # branch outputs must be typed
        value.type, value.shape = hidden.type, hidden.shape
    else_branch = ir.Graph([], [passed], nodes=[ir.node("Identity", [out], outputs=[passed])],
                           name=f"{b.prefix}/idle")
    then_branch = ir.Graph([], [result], nodes=inner.tape.nodes, name=f"{b.prefix}/routed")
    # any token routed here: the max of the experts' routing rows, with a zero column so that
    # zero tokens still reduce to a scalar (onnxruntime keeps the input shape for empty reductions)
    rows = b.op("Slice", routed, b.const(np.array([experts.start], np.int64)),
                b.const(np.array([experts.stop], np.int64)), b.const(np.array([0], np.int64)))
    padded = b.op("Concat", rows, b.const(np.zeros((len(experts), 1), np.float32)), axis=1)
    busy = b.op("Greater", b.op("ReduceMax", padded, keepdims=0), b.const(np.float32(0.5)))
    result = b.op("If", busy, then_branch=then_branch, else_branch=else_branch)
    result.type, result.shape = hidden.type, hidden.shape
    return result


def lower_moe_node(model: ir.Model, node: ir.Node, experts_per_subgraph: int | None = None) -> None:
    """Replace one MoE node by its routed standard-op graph; a layer with more experts than
    `experts_per_subgraph` computes them in If subgraphs of that many."""
    graph = model.graph
    spec = moe_spec(node)
    inputs = moe_inputs(node)
    stacked = {name: const_tensor(inputs[name]) for name in INPUT_NAMES[2:]}
    num_experts, _, hidden_size = stacked["gate"].shape
    b = _Builder(graph, f"layers.{spec.layer}.moe")
    hidden, logits = inputs["hidden"], inputs["router_logits"]

    weights, indices, keep = _gating(b, model, hidden, logits, inputs["score_bias"], spec, num_experts, hidden_size)
    zeros = b.op("Mul", logits, b.const(np.float32(0)))
    kept = b.op("Cast", keep, to=ir.DataType.FLOAT)
    routed = b.op("Transpose", b.op("ScatterElements", zeros, indices, kept, axis=1), perm=[1, 0])
    dense_weights = b.op("Transpose", b.op("ScatterElements", zeros, indices, weights, axis=1),
                         perm=[1, 0])
    out = b.op("Mul", hidden, b.const(np.float32(0)))
    if experts_per_subgraph is None or num_experts <= experts_per_subgraph:
        out = _routed_experts(b, out, range(num_experts), hidden, routed, dense_weights, stacked, spec)
    else:
        for first in range(0, num_experts, experts_per_subgraph):
            experts = range(first, min(first + experts_per_subgraph, num_experts))
            out = _routed_experts_subgraph(b, graph, out, experts, hidden, routed, dense_weights, stacked, spec)

    b.prefix = f"layers.{spec.layer}.moe"
    computed = b.op("ReduceSum", b.op("Cast", keep, to=ir.DataType.INT64), keepdims=0)
    computed.name = f"{ACTIVATIONS_OUTPUT}.{spec.layer}"
    computed.type, computed.shape = ir.TensorType(ir.DataType.INT64), ir.Shape([])
    ir.convenience.replace_nodes_and_values(graph, node, [node], b.tape.nodes, node.outputs, [out])
    graph.outputs.append(computed)


class LowerMoEPass(ir.passes.InPlacePass):
    """Lower every moec::MoE node (the 3-D expert initializers it leaves unused are for
    RemoveUnusedNodesPass to drop). Layers with more than `experts_per_subgraph` experts compute
    them in If subgraphs of that many (the default: never)."""

    def __init__(self, experts_per_subgraph: int | None = None):
        super().__init__()
        self.experts_per_subgraph = experts_per_subgraph

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        nodes = [n for n in model.graph if is_moe_node(n)]
        for node in nodes:
            lower_moe_node(model, node, self.experts_per_subgraph)
        if nodes:
            used = {n.overload for n in model.graph if n.domain == DOMAIN and n.op_type == GATING_OP_TYPE}
            for proto in function_protos():
                if proto.overload in used or proto.name == SHARED_OP_TYPE:
                    function = ir.serde.deserialize_function(proto)
                    model.functions[function.identifier()] = function
            model.opset_imports.setdefault(DOMAIN, 1)
        return ir.passes.PassResult(model, modified=bool(nodes))
