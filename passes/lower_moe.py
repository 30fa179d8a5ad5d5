"""Lower each `moec::Experts` node to standard ONNX ops that compute only the routed experts.

Matches: every node of domain `moec`, type `Experts` (see moec.ops.moe for its semantics).
Produces, in its place:
  - in a layer the plan prunes (beta > 0 or top_p < 1), its dynamic pruning as one moec.DynamicGating call (an
    ONNX function added to the model) giving the kept weights and keep [T, k]; it reads the graph
    input `prune_experts` (bool, default true), so pruning can be switched off at run time;
  - a graph output `expert_activations.{layer}`: the (token, expert) pairs the layer computed
    (`expert_activations.pass{n}.{layer}` for the n-th further pass of a looped layer);
  - with `sentinel`, a route naming expert E (no expert) computed by none;
  - the (expert, token) pairs routed and kept, expert-major (one NonZero on the routing mask), their
    hidden rows gathered once and Split by expert (sizes known only at run time);
  - per expert e: gate/up/down MatMuls on just its rows with expert e's own initializers
    (`expert_weight_name`: `layers.{l}.experts.{e}.{gate,up,down}_proj`, [in, out]); a dropped
    expert (the node's `dropped`, never routed to: passes/mask_dropped_experts.py) has none;
  - the outputs concatenated back in pair order, scaled by the routing weights, scattered into
    their (token, rank) slots and summed over the ranks;
  - with `fused` (a FusedExperts: the quantization specs and the widths onnxruntime's
    com.microsoft.QMoE computes), the layer's quantized experts of each such width as one QMoE node
    instead: its router_probs and router_weights are both the kept routing weights of the group's
    experts (zero for a pair not kept): its top-k picks each token's kept experts of its width (at
    most k of them have a positive weight) and it computes no pair whose weight is zero;
    gate and up are packed interleaved (swiglu_fusion=1). The groups' outputs and the per-expert
    part add up to the layer's output. Experts QMoE cannot express (float, a width it does not
    take, an activation or block size it lacks) stay per expert.
No token runs an expert it was not routed to and no weight is gathered per token. Per expert
that is only its MatMuls and activation (5 nodes after onnxruntime's fusions, against 15 when each
expert found, gathered and scattered its own tokens): at decode most experts are idle and each
node costs microseconds.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from moec.ops.dynamic_gating import OP_TYPE as GATING_OP_TYPE
from moec.ops.dynamic_gating import function_proto
from moec.ops.moe import (ACTIVATIONS_OUTPUT, DOMAIN, INPUT_NAMES, OP_TYPE, PRUNE_SWITCH, ExpertsSpec,
                          expert_bias, expert_projection, expert_weight_name, qmoe_group_name)
from moec.quant import ComputedTogether, Quantizer, pack_matmul_nbits


@dataclass(frozen=True)
class FusedExperts:
    """Which experts the lowering hands to com.microsoft.QMoE: in layers of at least `min_experts`
    experts, the quantized ones (by `specs`, the plan's quantization map) stored at one of `widths`,
    run at `accuracy_level`."""

    specs: Mapping[str, Quantizer]
    widths: frozenset[int]
    accuracy_level: int
    min_experts: int = 0


def is_moe_node(node: ir.Node) -> bool:
    return node.domain == DOMAIN and node.op_type == OP_TYPE


def moe_spec(node: ir.Node) -> ExpertsSpec:
    return ExpertsSpec.from_attributes({name: attr.value for name, attr in node.attributes.items()})


def moe_inputs(node: ir.Node) -> dict[str, ir.Value | None]:
    inputs = list(node.inputs) + [None] * (len(INPUT_NAMES) - len(node.inputs))
    return dict(zip(INPUT_NAMES, inputs))


def const_tensor(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The tensor of an initializer/constant input, None for an absent optional input."""
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is None:
        raise ValueError(f"Experts input {value.name!r} must be a constant (initializer)")
    return tensor


class _StackedArrays(dict):
    """The node's stacked weight tensors, read as NumPy arrays when an expert's slice is read."""

    def __getitem__(self, name):
        tensor = super().__getitem__(name)
        return None if tensor is None else tensor.numpy()

    def get(self, name, default=None):
        return self[name] if name in self else default

    def dims(self, spec: ExpertsSpec) -> tuple[int, int, int]:
        """(experts, hidden, intermediate), from the stored down projection's shape."""
        experts, *rest = dict.__getitem__(self, "down").shape
        return (experts, *(rest[::-1] if spec.transposed else rest))


def expert_slice(stacked: _StackedArrays, expert: int, proj: str, spec: ExpertsSpec, dtype: ir.DataType,
                 bias: bool = False) -> ir.LazyTensor:
    """Expert `expert`'s `proj` weight as MatMul wants it ([in, out]; or its bias [out]) in `dtype`,
    computed only when read: the expert weights of a whole model never sit in memory together, nor
    one layer's in a wider dtype than stored."""
    def array():  # a view of the stored tensor: MatMulNBits reads a weight back as [out, in], the writer copies it once
        if bias:
            return expert_bias(stacked, expert, proj, spec)
        return expert_projection(stacked, expert, proj, spec).T

    _, hidden, intermediate = stacked.dims(spec)
    out = hidden if proj == "down" else intermediate
    shape = ir.Shape([out] if bias else [intermediate if proj == "down" else hidden, out])
    return ir.LazyTensor(lambda: ir.tensor(array().astype(dtype.numpy(), copy=False)), dtype=dtype, shape=shape)


class Builder:
    """A tape with constant helpers; nodes are named under `prefix`."""

    def __init__(self, graph: ir.Graph | None, prefix: str, tag: str = "", main: ir.Graph | None = None):
        self.tape = ir.tape.Tape(graph)
        self.main = main or graph  # where the weights live (a subgraph's builder has no graph of its own)
        self.prefix = prefix
        self.tag = tag  # after the prefix: a looped layer's further passes name their nodes apart
        self.count = 0

    def op(self, op_type, *inputs, name=None, **attrs):
        return self.op_multi(op_type, *inputs, num_outputs=1, name=name, **attrs)[0]

    def op_multi(self, op_type, *inputs, num_outputs, name=None, domain="", overload="", **attrs):
        """Nodes and their outputs are named uniquely (`prefix/op_n`, `:i` for the i-th output): an
        If subgraph shares one namespace with the graph around it."""
        self.count += 1
        node_name = f"{self.prefix}{self.tag}/{name or op_type}_{self.count}"
        outputs = self.tape.op_multi_out(op_type, list(inputs), attrs or None, num_outputs=num_outputs,
                                         domain=domain, overload=overload, name=node_name)
        for i, value in enumerate(outputs):
            value.name = node_name if num_outputs == 1 else f"{node_name}:{i}"
        return outputs

    def const(self, array, name=None):
        return self.op("Constant", value=ir.tensor(np.asarray(array)), name=name or "Constant")

    def weight(self, tensor: ir.TensorProtocol, name: str) -> ir.Value:
        """The initializer `name`; a layer run twice per token (a looped layer: one Experts node per
        pass, the same weights) reads the one its first pass registered."""
        if (existing := self.main.initializers.get(name)) is not None:
            return existing
        tensor.name = name
        return self.tape.initializer(tensor, name=name)


def dynamic_gating(b: Builder, model: ir.Model, hidden: ir.Value, weights: ir.Value, indices: ir.Value,
                   spec: ExpertsSpec, num_experts: int, hidden_size: int) -> tuple[ir.Value, ir.Value]:
    """A moec.DynamicGating call for the layer's pruning: (kept weights, keep) [T, k]. Importance is
    the L1 norm of each token's hidden state (as a MatMul with ones: onnxruntime's reductions return
    wrong shapes for zero tokens). It reads the graph's run-time switch PRUNE_SWITCH."""
    ones = b.const(np.ones((hidden_size, 1), np.float32))
    importance = b.op("Squeeze", b.op("MatMul", b.op("Abs", hidden), ones), b.const(np.array([1], np.int64)))
    keep_experts = b.const(np.isin(np.arange(num_experts), spec.keep_experts), name="keep_experts")
    return b.op_multi(GATING_OP_TYPE, weights, indices, importance, _prune_switch(model.graph), keep_experts,
                      num_outputs=2, domain=DOMAIN, beta=spec.beta, top_p=spec.top_p,
                      protect_fraction=spec.protect_fraction)


def add_gating_function(model: ir.Model) -> None:
    """The moec.DynamicGating function (and the moec opset), where a node calls it."""
    if any(n.domain == DOMAIN and n.op_type == GATING_OP_TYPE for n in model.graph):
        function = ir.serde.deserialize_function(function_proto())
        model.functions[function.identifier()] = function
        model.opset_imports.setdefault(DOMAIN, 1)


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


def _expert(b: Builder, x: ir.Value, stacked: _StackedArrays, spec: ExpertsSpec, expert: int, dtype: ir.DataType):
    """The expert's projections and activation on its tokens x [n, H] of `dtype`."""
    def linear(inp, proj):
        name = expert_weight_name(spec.layer, expert, proj)
        y = b.op("MatMul", inp, b.weight(expert_slice(stacked, expert, proj, spec, dtype), name), name=f"{proj}_proj")
        if dict.get(stacked, "down_bias" if proj == "down" else "gate_up_bias") is None:
            return y
        return b.op("Add", y, b.weight(expert_slice(stacked, expert, proj, spec, dtype, bias=True), f"{name}.bias"))

    def scalar(value):  # in the activations' dtype
        return b.const(np.array(value, dtype.numpy()))

    def act(v):
        if spec.activation in ("silu", "clamped_silu"):
            return b.op("Mul", v, b.op("Sigmoid", v))
        if spec.activation in ("gelu", "gelu_tanh"):
            return b.op("Gelu", v, approximate="tanh" if spec.activation == "gelu_tanh" else "none")
        relu = b.op("Relu", v)
        return b.op("Mul", relu, relu) if spec.activation == "relu2" else relu

    up = linear(x, "up")
    if spec.gate == "none":
        hidden = act(up)
    elif spec.activation == "softcapped_swiglu":
        def cap(v, c):
            return b.op("Mul", b.op("Tanh", b.op("Div", v, scalar(c))), scalar(c))

        gate = linear(x, "gate")
        hidden = b.op("Mul", b.op("Mul", cap(gate, spec.gate_softcap), b.op("Sigmoid", gate)), cap(up, spec.up_softcap))
    elif spec.activation in ("clamped_swiglu", "clamped_silu"):
        limit = spec.swiglu_limit
        gate = b.op("Clip", linear(x, "gate"), None, scalar(limit))
        up = b.op("Clip", up, scalar(-limit), scalar(limit))
        if spec.activation == "clamped_silu":
            hidden = b.op("Mul", act(gate), up)
        else:
            glu = b.op("Mul", gate, b.op("Sigmoid", b.op("Mul", gate, scalar(spec.swiglu_alpha))))
            hidden = b.op("Mul", b.op("Add", up, scalar(1.0)), glu)
    elif spec.activation == "silu_clipped":
        limit = spec.swiglu_limit
        gate = linear(x, "gate")
        hidden = b.op("Mul", b.op("Clip", b.op("Mul", gate, b.op("Sigmoid", gate)), None, scalar(limit)),
                      b.op("Clip", up, scalar(-limit), scalar(limit)))
    else:
        hidden = b.op("Mul", act(linear(x, "gate")), up)
    return linear(hidden, "down")


def _sorted_by_expert(b: Builder, hidden: ir.Value, routed: ir.Value, dense_weights: ir.Value,
                      dense_ranks: ir.Value, num_experts: int):
    """The (expert, token) pairs to compute, expert-major as NonZero lists them: each pair's
    (token, rank in the token's top-k) [n, 2], hidden row [n, H] and routing weight [n, 1], and
    each expert's pair count [E]."""
    last_axis = b.const(np.array([-1], np.int64))
    pairs = b.op("NonZero", routed)  # [2, n]: expert row, token column
    by_pair = b.op("Transpose", pairs, perm=[1, 0])
    tokens = b.op("Gather", pairs, b.const(np.array(1, np.int64)), axis=0)
    rows = b.op("Gather", hidden, tokens, axis=0)
    weights = b.op("Unsqueeze", b.op("GatherND", dense_weights, by_pair), last_axis)
    ranks = b.op("Cast", b.op("GatherND", dense_ranks, by_pair), to=ir.DataType.INT64)
    slots = b.op("Concat", b.op("Unsqueeze", tokens, last_axis), b.op("Unsqueeze", ranks, last_axis), axis=1)
    # a zero column, so that zero tokens still reduce to [E] (onnxruntime keeps the input shape for
    # empty reductions)
    padded = b.op("Concat", routed, b.const(np.zeros((num_experts, 1), np.float32)), axis=1)
    counts = b.op("Cast", b.op("ReduceSum", padded, b.const(np.array([1], np.int64)), keepdims=0),
                  to=ir.DataType.INT64)
    return slots, rows, weights, counts


def _routed_experts(b: Builder, experts: range, rows: list[ir.Value], stacked: _StackedArrays, spec: ExpertsSpec,
                    skipped: set[int], dtype: ir.DataType) -> list[ir.Value]:
    """Each expert's output on its own rows (one Split output each); `skipped` ones (dropped, or
    computed by QMoE) have none."""
    outputs = []
    for e, x in zip(experts, rows):
        if e in skipped:  # never routed here: its rows are always empty
            continue
        b.prefix = f"layers.{spec.layer}.experts.{e}"
        outputs.append(_expert(b, x, stacked, spec, e, dtype))
    return outputs


def _routed_experts_subgraph(b: Builder, graph: ir.Graph, experts: range, rows: list[ir.Value], counts: ir.Value,
                             stacked: _StackedArrays, spec: ExpertsSpec, skipped: set[int],
                             dtype: ir.DataType) -> ir.Value:
    """The experts' outputs, concatenated, as the then-branch of an If that runs only when some token
    is routed to one of these experts (else all their rows are empty, and so is the output). Why:
    onnxruntime's session creation grows about quadratically with the nodes of one graph (128
    experts x 8 layers: 46 s flat, 8 s with a subgraph per layer), while a subgraph is planned on its own."""
    inner = Builder(None, b.prefix, b.tag, main=graph)
    inner.count = b.count
    outputs = _routed_experts(inner, experts, rows, stacked, spec, skipped, dtype)
    result = inner.op("Concat", *outputs, axis=0)
    b.count, b.prefix = inner.count, f"layers.{spec.layer}.experts.{experts.start}-{experts.stop - 1}"
    for value in inner.tape.initializers:  # weights live in the main graph, where they are written and packed
        graph.register_initializer(value)
    empty = ir.Value(name=None)
    hidden_size = stacked.dims(spec)[1]
    for value in (result, empty):  # branch outputs must be typed; their rows are the chunk's pairs
        value.type, value.shape = ir.TensorType(dtype), ir.Shape([None, hidden_size])
    else_branch = ir.Graph([], [empty], nodes=[ir.node("Identity", [rows[0]], outputs=[empty])],
                           name=f"{b.prefix}{b.tag}/idle")
    then_branch = ir.Graph([], [result], nodes=inner.tape.nodes, name=f"{b.prefix}{b.tag}/routed")
    chunk = b.op("Slice", counts, b.const(np.array([experts.start], np.int64)),
                 b.const(np.array([experts.stop], np.int64)))
    busy = b.op("Greater", b.op("ReduceMax", chunk, keepdims=0), b.const(np.array(0, np.int64)))
    output = b.op("If", busy, then_branch=then_branch, else_branch=else_branch)
    output.type, output.shape = result.type, result.shape
    return output


def _qmoe_groups(spec: ExpertsSpec, stacked: _StackedArrays, fused: FusedExperts | None,
                 dtype: ir.DataType) -> dict[int, tuple[int, list[int]]]:
    """{stored width: (block size, experts)} that QMoE computes in this layer: quantized experts whose
    three projections share a width in `fused.widths` and a block size QMoE takes (a power of two
    dividing hidden and intermediate sizes at least twice: its 4/8-bit kernels need two blocks a
    row), the group's first expert's (a plan has one), for the gated activations it has (SiLU, and
    gpt-oss's clamped SwiGLU), in float32. QMoE skips a pair whose routing weight is not above 1e-8,
    so this assumes non-negative routing weights, as softmax and sigmoid routers give (every
    supported family: the every-family test verifies each through QMoE)."""
    num_experts, hidden_size, intermediate = stacked.dims(spec)
    if fused is None or num_experts < fused.min_experts or dtype != ir.DataType.FLOAT or spec.gate == "none" or \
            spec.activation not in ("silu", "clamped_swiglu"):
        return {}
    groups = {}
    for e in range(num_experts):
        quantizers = [fused.specs.get(expert_weight_name(spec.layer, e, p)) for p in spec.projections]
        if e in spec.dropped or None in quantizers:
            continue
        kinds = {(q.stored_bits, q.group_size) for q in quantizers}
        if len(kinds) != 1:
            continue
        (bits, block), = kinds
        if bits in fused.widths and block >= 16 and block & (block - 1) == 0 and \
                min(hidden_size, intermediate) >= 2 * block and not hidden_size % block and not intermediate % block \
                and groups.setdefault(bits, (block, []))[0] == block:
            groups[bits][1].append(e)
    return groups


class _PackedGroup:
    """A QMoE group's weight inputs (QMOE_INPUTS), computed together when written
    (moec.quant.ComputedTogether): gate and up interleaved row by row into fc1, down as fc2, each
    expert quantized by its own spec (GPTQ's result where it has one) and packed as MatMulNBits
    packs a weight, then stacked."""

    def __init__(self, stacked: _StackedArrays, spec: ExpertsSpec, experts: list[int], fused: FusedExperts,
                 bits: int, block: int):
        self.stacked, self.spec, self.experts, self.fused = stacked, spec, experts, fused
        self.bits, self.block = bits, block
        self.has_bias = {"fc1": dict.get(stacked, "gate_up_bias") is not None,
                         "fc2": dict.get(stacked, "down_bias") is not None}
        self.arrays = ComputedTogether(self._compute)

    def _quantized(self, expert: int, proj: str):
        quantizer = self.fused.specs[expert_weight_name(self.spec.layer, expert, proj)]
        if quantizer.result is not None:
            return quantizer.result
        weight = np.asarray(expert_projection(self.stacked, expert, proj, self.spec), np.float32)
        return quantizer(weight)

    def _compute(self) -> dict[str, np.ndarray]:
        stacked = {}  # filled an expert at a time: no more than the group's packed bytes held

        def put(name, index, array):
            if name not in stacked:
                stacked[name] = np.empty((len(self.experts), *array.shape), array.dtype)
            stacked[name][index] = array

        for index, e in enumerate(self.experts):
            gate, up, down = (self._quantized(e, p) for p in ("gate", "up", "down"))
            pairs = ((gate.codes, up.codes), (gate.scales, up.scales), (gate.zeros, up.zeros))
            fc1 = [np.empty((2 * g.shape[0], *g.shape[1:]), g.dtype) for g, _ in pairs]
            for array, (g, u) in zip(fc1, pairs):  # rows gate, up, gate, up, ...
                array[0::2], array[1::2] = g, u
            for fc, (codes, scales, zeros) in (("fc1", fc1), ("fc2", (down.codes, down.scales, down.zeros))):
                packed, scales, zeros = pack_matmul_nbits(codes, scales, zeros, self.bits, self.block)
                put(f"{fc}.q", index, packed.reshape(packed.shape[0], -1))
                put(f"{fc}.scales", index, scales)
                put(f"{fc}.zero_points", index, zeros)
            if self.has_bias["fc1"]:
                gate_bias, up_bias = (np.asarray(expert_bias(self.stacked, e, p, self.spec), np.float32)
                                      for p in ("gate", "up"))
                bias = np.empty(2 * gate_bias.shape[0], np.float32)
                bias[0::2], bias[1::2] = gate_bias, up_bias
                put("fc1.bias", index, bias)
            if self.has_bias["fc2"]:
                put("fc2.bias", index, np.asarray(expert_bias(self.stacked, e, "down", self.spec), np.float32))
        return stacked

    def tensor(self, name: str, dtype: ir.DataType, shape: list[int]) -> ir.LazyTensor:
        return ir.LazyTensor(lambda: ir.tensor(self.arrays.read(name)), dtype=dtype, shape=ir.Shape(shape))


QMOE_INPUTS = ("fc1.q", "fc1.scales", "fc1.bias", "fc2.q", "fc2.scales", "fc2.bias", "fc1.zero_points",
               "fc2.zero_points")


def _qmoe(b: Builder, hidden: ir.Value, dense_weights: ir.Value, top_k: int,
          stacked: _StackedArrays, spec: ExpertsSpec, experts: list[int], fused: FusedExperts, bits: int,
          block: int) -> ir.Value:
    """One com.microsoft.QMoE over `experts` (one width), given the layer's kept routing weights
    [T, E] (zero where not computed) as both router_probs and router_weights: a token has at most k
    positive weights, so QMoE's top-k picks exactly its kept experts of the group (padded with
    zero-weight pairs, which it skips) and weighs them by their routing weights."""
    _, hidden_size, intermediate = stacked.dims(spec)
    prefix = qmoe_group_name(spec.layer, bits)
    ids = b.weight(ir.tensor(np.array(experts, np.int64)), f"{prefix}.experts")
    weights = b.op("Gather", dense_weights, ids, axis=1)
    packed = _PackedGroup(stacked, spec, experts, fused, bits, block)
    count, u8, f32 = len(experts), ir.DataType.UINT8, ir.DataType.FLOAT
    shapes = {"fc1.q": (u8, [count, 2 * intermediate, hidden_size * bits // 8]),
              "fc1.scales": (f32, [count, 2 * intermediate, hidden_size // block]),
              "fc1.bias": (f32, [count, 2 * intermediate]),
              "fc2.q": (u8, [count, hidden_size, intermediate * bits // 8]),
              "fc2.scales": (f32, [count, hidden_size, intermediate // block]),
              "fc2.bias": (f32, [count, hidden_size]),
              "fc1.zero_points": (u8, [count, 2 * intermediate, -(-hidden_size // block * bits // 8)]),
              "fc2.zero_points": (u8, [count, hidden_size, -(-intermediate // block * bits // 8)])}
    inputs = {name: None if name.endswith("bias") and not packed.has_bias[name[:3]] else
              b.weight(packed.tensor(name, *shapes[name]), f"{prefix}.{name}") for name in QMOE_INPUTS}
    swiglu = {"activation_alpha": 1.0, "activation_beta": 0.0} if spec.activation == "silu" else \
        {"activation_alpha": spec.swiglu_alpha, "activation_beta": 1.0, "swiglu_limit": spec.swiglu_limit}
    b.prefix = prefix
    fc1_fc2 = [inputs[name] for name in QMOE_INPUTS[:6]]  # then fc3 (absent: gate and up are fused in fc1)
    zero_points = [inputs["fc1.zero_points"], inputs["fc2.zero_points"], None]
    out = b.op("QMoE", hidden, weights, *fc1_fc2, None, None, None, *zero_points, weights, domain="com.microsoft",
               name=f"QMoE ({bits}-bit)", k=min(top_k, count), activation_type="swiglu", swiglu_fusion=1,
               expert_weight_bits=bits, block_size=block, accuracy_level=fused.accuracy_level,
               normalize_routing_weights=0, **swiglu)
    out.type, out.shape = hidden.type, hidden.shape
    return out


def _per_expert(b: Builder, graph: ir.Graph, hidden: ir.Value, indices: ir.Value, zeros: ir.Value,
                dense_selected: ir.Value, dense_weights: ir.Value, stacked: _StackedArrays, spec: ExpertsSpec,
                skipped: set[int], dtype: ir.DataType, experts_per_subgraph: int | None) -> ir.Value:
    """The sum [T, H] (float32) of the routed experts computed one by one, but for `skipped` (never
    routed here: dropped, or computed by QMoE); `zeros` is the layer's [T, E] of zeros."""
    num_experts, hidden_size, _ = stacked.dims(spec)
    top_k = indices.shape[1]  # static in a traced graph (moec.trace_cache reads the router's k off it)
    ranks = b.op("Expand", b.const(np.arange(top_k, dtype=np.float32)), b.op("Shape", indices))
    dense_ranks = b.op("Transpose", b.op("ScatterElements", zeros, indices, ranks, axis=1), perm=[1, 0])
    routed, routed_weights = (b.op("Transpose", dense, perm=[1, 0]) for dense in (dense_selected, dense_weights))
    slots, rows, pair_weights, counts = _sorted_by_expert(b, hidden, routed, routed_weights, dense_ranks, num_experts)
    pieces = b.op_multi("Split", rows, counts, axis=0, num_outputs=num_experts)
    for piece in pieces:  # typed: If subgraphs read them from the graph around them
        piece.type = ir.TensorType(dtype)
    if experts_per_subgraph is None or num_experts <= experts_per_subgraph:
        outputs = _routed_experts(b, range(num_experts), pieces, stacked, spec, skipped, dtype)
    else:
        outputs = []
        for first in range(0, num_experts, experts_per_subgraph):
            experts = range(first, min(first + experts_per_subgraph, num_experts))
            if set(experts) <= skipped:
                continue
            outputs.append(_routed_experts_subgraph(b, graph, experts, pieces[experts.start:experts.stop], counts,
                                                    stacked, spec, skipped, dtype))

    b.prefix = f"layers.{spec.layer}.moe"
    # each pair's output, weighted, in its (token, rank) slot of a [T, k, H] tensor, then summed over
    # the ranks (a MatMul with ones: onnxruntime's reductions mishandle zero tokens). Not one
    # ScatterND adding into the tokens' rows: onnxruntime's CPU ScatterND with reduction="add"
    # races on repeated indices across threads (measured: 17 of 100 runs wrong on 2 threads)
    expert_outputs = b.op("Concat", *outputs, axis=0)
    if dtype != ir.DataType.FLOAT:
        expert_outputs = b.op("Cast", expert_outputs, to=ir.DataType.FLOAT)
    slots_shape = b.op("Concat", b.op("Shape", hidden, end=1), b.const(np.array([top_k, hidden_size], np.int64)),
                       axis=0)
    by_rank = b.op("ScatterND", b.op("ConstantOfShape", slots_shape, value=ir.tensor(np.zeros(1, np.float32))),
                   slots, b.op("Mul", expert_outputs, pair_weights))
    return b.op("Squeeze", b.op("MatMul", b.op("Transpose", by_rank, perm=[0, 2, 1]),
                                b.const(np.ones((top_k, 1), np.float32))), b.const(np.array([2], np.int64)))


def lower_moe_node(model: ir.Model, node: ir.Node, experts_per_subgraph: int | None = None,
                   fused: FusedExperts | None = None, repeat: int = 0) -> None:
    """Replace one Experts node by its routed standard-op graph; a layer with more experts than
    `experts_per_subgraph` computes them in If subgraphs of that many, and `fused` hands experts
    to QMoE (see the module docstring). `repeat` counts the layer's nodes lowered before this one
    (a looped layer runs its experts once per pass): their nodes and outputs are named apart, their
    weights shared."""
    graph = model.graph
    spec = moe_spec(node)
    inputs = moe_inputs(node)
    stacked = _StackedArrays({name: const_tensor(inputs[name]) for name in INPUT_NAMES[3:]})
    num_experts, hidden_size, _ = stacked.dims(spec)
    b = Builder(graph, f"layers.{spec.layer}.moe", f".pass{repeat}" if repeat else "")
    hidden, indices = inputs["hidden"], inputs["top_k_index"]
    dtype = hidden.dtype or ir.DataType.FLOAT

    # the pruning, and the sum over experts, in float32 whatever the activations' dtype
    def float32(value):
        return value if dtype == ir.DataType.FLOAT else b.op("Cast", value, to=ir.DataType.FLOAT)

    hidden32, weights = float32(hidden), b.op("Cast", inputs["top_k_weights"], to=ir.DataType.FLOAT)
    real = None
    if spec.sentinel:  # a route to expert E goes nowhere: computed by none, as one to expert E - 1 at weight 0
        real = b.op("Less", indices, b.const(np.array(num_experts, np.int64)))
        clamped = b.op("Min", indices, b.const(np.array(num_experts - 1, np.int64)))
        clamped.type, clamped.shape, indices = indices.type, indices.shape, clamped
    keep = None
    if spec.prunes:
        weights, keep = dynamic_gating(b, model, hidden32, weights, indices, spec, num_experts, hidden_size)
    if real is not None:
        keep = real if keep is None else b.op("And", keep, real)
    tokens_by_experts = b.op("Concat", b.op("Shape", hidden, end=1), b.const(np.array([num_experts], np.int64)),
                             axis=0)
    zeros = b.op("ConstantOfShape", tokens_by_experts, value=ir.tensor(np.zeros(1, np.float32)))
    selected = None if keep is None else b.op("Cast", keep, to=ir.DataType.FLOAT)  # [T, k]: 1 where computed
    if spec.dropped:  # a router may still name one, at weight 0 (Zaya writes "no expert" as expert 0)
        alive = b.op("Gather", b.const(np.isin(np.arange(num_experts), spec.dropped, invert=True)
                                       .astype(np.float32)), indices)
        selected = alive if selected is None else b.op("Mul", selected, alive)
    if selected is not None:
        weights = b.op("Mul", weights, selected)
    # [T, E]: the routing weight where the token computes the expert, else 0; added up where a token's
    # top-k names an expert twice (LongCat-Flash maps its zero-computation experts, at weight 0, onto
    # real ones, which may be among the token's own)
    dense_weights = b.op("ScatterElements", zeros, indices, weights, axis=1, reduction="add")
    groups = _qmoe_groups(spec, stacked, fused, dtype)
    fused_experts = {e for _, experts in groups.values() for e in experts}
    skipped = fused_experts | set(spec.dropped)
    parts = []
    if len(skipped) < num_experts:
        if selected is None:
            selected = b.op("Expand", b.const(np.float32(1)), b.op("Shape", indices))
        # [T, E]: 1 where computed (a route to no expert, at 0, may share its row with one to expert E - 1)
        rest = b.op("ScatterElements", zeros, indices, selected, axis=1,
                    **({} if real is None else {"reduction": "max"}))
        if fused_experts:
            unfused = np.isin(np.arange(num_experts), sorted(fused_experts), invert=True)
            rest = b.op("Mul", rest, b.const(unfused.astype(np.float32)))
        parts.append(_per_expert(b, graph, hidden, indices, zeros, rest, dense_weights, stacked, spec, skipped,
                                 dtype, experts_per_subgraph))
    for bits, (block, experts) in groups.items():
        parts.append(_qmoe(b, hidden, dense_weights, indices.shape[1], stacked, spec, experts, fused, bits,
                           block))
    b.prefix = f"layers.{spec.layer}.moe"
    out = parts[0]
    for part in parts[1:]:
        out = b.op("Add", out, part)
    if dtype != ir.DataType.FLOAT:
        out = b.op("Cast", out, to=dtype)
    out.type, out.shape = hidden.type, hidden.shape
    computed = b.op("Size", indices) if keep is None else \
        b.op("ReduceSum", b.op("Cast", keep, to=ir.DataType.INT64), keepdims=0)
    computed.name = f"{ACTIVATIONS_OUTPUT}.{f'pass{repeat}.' if repeat else ''}{spec.layer}"
    computed.type, computed.shape = ir.TensorType(ir.DataType.INT64), ir.Shape([])
    ir.convenience.replace_nodes_and_values(graph, node, [node], b.tape.nodes, node.outputs, [out])
    graph.outputs.append(computed)


class LowerMoEPass(ir.passes.InPlacePass):
    """Lower every moec::Experts node (the 3-D expert initializers it leaves unused are for
    RemoveUnusedNodesPass to drop). Layers with more than `experts_per_subgraph` experts compute
    them in If subgraphs of that many (the default: never); `fused` hands experts to QMoE."""

    def __init__(self, experts_per_subgraph: int | None = None, fused: FusedExperts | None = None):
        super().__init__()
        self.experts_per_subgraph = experts_per_subgraph
        self.fused = fused

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        nodes = [n for n in model.graph if is_moe_node(n)]
        lowered = collections.Counter()  # per layer: its nodes lowered so far
        for node in nodes:
            layer = moe_spec(node).layer
            lower_moe_node(model, node, self.experts_per_subgraph, self.fused, lowered[layer])
            lowered[layer] += 1
        if nodes:
            add_gating_function(model)
            if any(n.op_type == "QMoE" for n in model.graph):
                model.opset_imports.setdefault("com.microsoft", 1)
        return ir.passes.PassResult(model, modified=bool(nodes))
