"""Lower each `moec::MoE` node to standard ONNX ops that compute only the routed experts.

Matches: every node of domain `moec`, type `MoE` (see moec.ops.moe for its semantics).
Produces, in its place:
  - the routing as standard ops (Softmax/Sigmoid, TopK, ...) giving weights and indices [T, k];
  - per expert e: the tokens routed to e (NonZero on its column of the routing mask), their
    hidden rows gathered, gate/up/down MatMuls on just those rows with expert e's own
    initializers (`expert_weight_name`: `layers.{l}.experts.{e}.{gate,up,down}_proj`, [in, out]), scaled by the
    routing weight and scatter-added into the output.
No token runs an expert it was not routed to and no weight is gathered per token.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from moec.ops.moe import DOMAIN, INPUT_NAMES, OP_TYPE, MoESpec, expert_weight_name


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


def expert_slice(stacked: ir.TensorProtocol, expert: int, transpose: bool) -> ir.LazyTensor:
    """stacked[expert] (transposed if asked), computed only when read: the expert weights of a
    whole model never sit in memory together."""
    dims = list(stacked.shape)[1:]
    shape = ir.Shape(dims[::-1] if transpose else dims)

    def read():
        array = stacked.numpy()[expert]
        return ir.tensor(np.ascontiguousarray(array.T if transpose else array))

    return ir.LazyTensor(read, dtype=stacked.dtype, shape=shape)


class _Builder:
    """A tape with constant helpers; nodes are named under `prefix`."""

    def __init__(self, graph: ir.Graph, prefix: str):
        self.tape = ir.tape.Tape(graph)
        self.prefix = prefix
        self.count = 0

    def op(self, op_type, *inputs, name=None, **attrs):
        self.count += 1
        return self.tape.op(op_type, list(inputs), attrs or None,
                            name=f"{self.prefix}/{name or op_type}_{self.count}")

    def op_multi(self, op_type, *inputs, num_outputs, **attrs):
        self.count += 1
        return self.tape.op_multi_out(op_type, list(inputs), attrs or None, num_outputs=num_outputs,
                                      name=f"{self.prefix}/{op_type}_{self.count}")

    def const(self, array, name=None):
        return self.op("Constant", value=ir.tensor(np.asarray(array)), name=name or "Constant")

    def weight(self, tensor: ir.TensorProtocol, name: str) -> ir.Value:
        tensor.name = name
        return self.tape.initializer(tensor, name=name)


def _routing(b: _Builder, logits: ir.Value, score_bias: ir.Value | None, spec: MoESpec,
             num_experts: int):
    """Emit the routing of `spec`; returns (weights [T, k], indices [T, k] int64)."""
    k = b.const(np.array([spec.top_k], np.int64))
    if spec.scoring == "sparsemixer":
        return _sparsemixer(b, logits, spec.jitter_eps)
    if spec.scoring == "softmax":
        scores = b.op("Softmax", logits, axis=-1)
        choice = scores
    else:
        scores = b.op("Sigmoid", logits)
        choice = scores if score_bias is None else b.op("Add", scores, score_bias)
        if spec.n_group > 1:
            per_group = num_experts // spec.n_group
            grouped = b.op("Reshape", choice, b.const(np.array([0, spec.n_group, per_group], np.int64)))
            top2, _ = b.op_multi("TopK", grouped, b.const(np.array([2], np.int64)), num_outputs=2, axis=-1)
            group_scores = b.op("ReduceSum", top2, b.const(np.array([-1], np.int64)), keepdims=0)
            _, best_groups = b.op_multi("TopK", group_scores,
                                        b.const(np.array([spec.topk_group], np.int64)),
                                        num_outputs=2, axis=-1)
            ones = b.op("Expand", b.const(np.array(1.0, np.float32)), b.op("Shape", best_groups))
            group_mask = b.op("ScatterElements", b.op("Mul", group_scores, b.const(np.float32(0))),
                              best_groups, ones, axis=1)
            expert_mask = b.op("Reshape", b.op("Expand", b.op("Unsqueeze", group_mask,
                                                               b.const(np.array([-1], np.int64))),
                                               b.const(np.array([1, 1, per_group], np.int64))),
                               b.const(np.array([0, num_experts], np.int64)))
            choice = b.op("Where", b.op("Cast", expert_mask, to=ir.DataType.BOOL), choice,
                          b.const(np.float32(-np.inf)))
    _, indices = b.op_multi("TopK", choice, k, num_outputs=2, axis=-1)
    weights = b.op("GatherElements", scores, indices, axis=1)
    if spec.normalize:
        total = b.op("ReduceSum", weights, b.const(np.array([-1], np.int64)), keepdims=1)
        if spec.scoring == "sigmoid":
            total = b.op("Add", total, b.const(np.float32(1e-20)))
        weights = b.op("Div", weights, total)
    if spec.scaling != 1.0:
        weights = b.op("Mul", weights, b.const(np.float32(spec.scaling)))
    return weights, indices


def _sparsemixer(b: _Builder, logits: ir.Value, jitter_eps: float):
    """PhiMoE eval-mode routing, two picks, each a softmax over the logits near the max."""
    minus_inf = b.const(np.float32(-np.inf))
    threshold = b.const(np.float32(2 * jitter_eps))
    abs_logits = b.op("Abs", logits)
    masked, weights, picks = logits, [], []
    for _ in range(2):
        best = b.op("ReduceMax", masked, b.const(np.array([-1], np.int64)), keepdims=1)
        pick = b.op("ArgMax", masked, axis=-1, keepdims=1)
        factor = b.op("Max", abs_logits, best)
        far = b.op("Greater", b.op("Div", b.op("Sub", best, logits), factor), threshold)
        gates = b.op("Softmax", b.op("Where", far, minus_inf, masked), axis=-1)
        weights.append(b.op("GatherElements", gates, pick, axis=1))
        picks.append(pick)
        masked = b.op("ScatterElements", masked, pick, b.op("Expand", minus_inf, b.op("Shape", pick)),
                      axis=1)
    return b.op("Concat", *weights, axis=1), b.op("Concat", *picks, axis=1)


def _expert(b: _Builder, x: ir.Value, stacked: dict[str, ir.TensorProtocol | None], spec: MoESpec,
            expert: int):
    """gate/up/down on the expert's tokens x [n, H]; stacked weights [E, out, in], biases [E, out]."""
    def linear(inp, proj):
        name = expert_weight_name(spec.layer, expert, proj)
        weight = expert_slice(stacked[proj], expert, transpose=True)
        y = b.op("MatMul", inp, b.weight(weight, name), name=f"{proj}_proj")
        bias = stacked[f"{proj}_bias"]
        return y if bias is None else b.op("Add", y, b.weight(expert_slice(bias, expert, False), f"{name}.bias"))

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


def lower_moe_node(graph: ir.Graph, node: ir.Node) -> None:
    """Replace one MoE node by its routed standard-op graph."""
    spec = moe_spec(node)
    inputs = moe_inputs(node)
    stacked = {name: const_tensor(inputs[name]) for name in INPUT_NAMES[2:]}
    num_experts = stacked["gate"].shape[0]
    b = _Builder(graph, f"layers.{spec.layer}.moe")
    hidden, logits = inputs["hidden"], inputs["router_logits"]

    weights, indices = _routing(b, logits, inputs["score_bias"], spec, num_experts)
    zeros = b.op("Mul", logits, b.const(np.float32(0)))
    ones = b.op("Expand", b.const(np.float32(1)), b.op("Shape", weights))
    routed = b.op("Transpose", b.op("ScatterElements", zeros, indices, ones, axis=1), perm=[1, 0])
    dense_weights = b.op("Transpose", b.op("ScatterElements", zeros, indices, weights, axis=1),
                         perm=[1, 0])
    last_axis = b.const(np.array([-1], np.int64))
    out = b.op("Mul", hidden, b.const(np.float32(0)))
    for e in range(num_experts):
        b.prefix = f"layers.{spec.layer}.experts.{e}"
        index = b.const(np.array(e, np.int64))
        tokens = b.op("Reshape", b.op("NonZero", b.op("Gather", routed, index, axis=0)), last_axis)
        x = b.op("Gather", hidden, tokens, axis=0)
        y = _expert(b, x, stacked, spec, e)
        token_weights = b.op("Unsqueeze", b.op("Gather", b.op("Gather", dense_weights, index, axis=0),
                                               tokens, axis=0), last_axis)
        out = b.op("ScatterND", out, b.op("Unsqueeze", tokens, last_axis),
                   b.op("Mul", y, token_weights), reduction="add")

    ir.convenience.replace_nodes_and_values(graph, node, [node], b.tape.nodes, node.outputs, [out])


class LowerMoEPass(ir.passes.InPlacePass):
    """Lower every moec::MoE node (the 3-D expert initializers it leaves unused are for
    RemoveUnusedNodesPass to drop)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        nodes = [n for n in model.graph if is_moe_node(n)]
        for node in nodes:
            lower_moe_node(model.graph, node)
        return ir.passes.PassResult(model, modified=bool(nodes))
