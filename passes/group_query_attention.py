"""Lower attention with a concatenated KV cache onto onnxruntime's `com.microsoft.GroupQueryAttention`.

Matches: an opset 23 Attention over 4-D [batch, heads, tokens, head size] query, keys and values
(same head size, query heads a multiple of KV heads, no past inputs of its own, no causal flag)
whose keys and values are each Concat(past input `past_key_values.L.key|value`, this step's, on
the token axis), that Concat being the graph's `present.L.*` output and the past input read
nowhere else but by Shape nodes.
Produces: GroupQueryAttention (rotary already applied: do_rotary 0) on the same tensors laid out
[batch, tokens, heads x head size], with the Attention's mask as its attention_bias (a boolean
mask as 0 / -inf), seqlens_k = total length - 1 for every row (the runtime pads on the left, so
every row has the attention mask's width) and total_sequence_length from the attention mask.
Its present outputs are the graph's `present.L.*`. Every Shape read of a matched past input's
token axis becomes the attention mask's width minus this step's tokens.

Why: GroupQueryAttention appends this step's keys and values in place when its past and present
are one buffer (onnxruntime's "past_present_share_buffer"; moec.runtime binds them so when the
past holds room for the total length), so a decode step no longer copies the whole cache the way
a Concat does. Given a past of exactly the earlier tokens it concatenates as before, so runners
that feed the last present back as the next past (plain onnxruntime, onnxruntime-genai) run it
unchanged.
"""

from __future__ import annotations

import re

import numpy as np
import onnx_ir as ir

PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)$")
ATTENTION_MASK = "attention_mask"  # graph input [batch, total tokens]
INPUT_IDS = "input_ids"  # graph input [batch, this step's tokens]


class GroupQueryAttentionPass(ir.passes.InPlacePass):
    """See the module docstring (moec.record lists the past inputs it lets the runtime share with
    their presents: moec.json's `kv_in_place`)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        inputs = {v.name: v for v in graph.inputs}
        matches = [m for node in graph if (m := _match(graph, node)) is not None]
        if not matches or ATTENTION_MASK not in inputs or INPUT_IDS not in inputs:
            return ir.passes.PassResult(model, False)
        tape = ir.tape.Tape()
        lengths = tape.op("Shape", [inputs[ATTENTION_MASK]])  # [batch, total]
        total = tape.op("Slice", [lengths, _const(tape, [1]), _const(tape, [2])])
        past_tokens = tape.op("Sub", [total, tape.op("Shape", [inputs[INPUT_IDS]], {"start": 1, "end": 2})])
        total32 = tape.op("Cast", [tape.op("Squeeze", [total])], {"to": ir.DataType.INT32})
        seqlens_k = tape.op("Expand", [tape.op("Sub", [total32, _const(tape, np.int32(1))]),
                                       tape.op("Slice", [lengths, _const(tape, [0]), _const(tape, [1])])])
        graph.insert_before(next(iter(graph)), _named(tape.nodes, "kv_lengths"))
        for node, pasts, concats in matches:
            _lower(graph, node, pasts, concats, seqlens_k, total32)
            for past in pasts:
                for use in [u for u in past.uses() if u.node.op_type == "Shape"]:
                    _past_shape_from_mask(graph, use.node, past, past_tokens)
        model.opset_imports.setdefault("com.microsoft", 1)
        return ir.passes.PassResult(model, True)


def _match(graph: ir.Graph, node: ir.Node):
    """(Attention node, its (key, value) past inputs, their Concats), or None."""
    if node.op_type != "Attention" or node.domain != "" or len(node.inputs) < 3 or \
            any(v is not None for v in node.inputs[4:]) or node.attributes.get_int("is_causal", 0) or \
            node.attributes.get_int("qk_matmul_output_mode", 0) or any(o.uses() for o in node.outputs[1:]):
        return None
    query, keys, values = node.inputs[:3]
    mask = node.inputs[3] if len(node.inputs) > 3 else None
    if mask is not None and mask.dtype not in (ir.DataType.BOOL, ir.DataType.FLOAT):  # an additive float32 mask
        return None
    pasts, concats = [], []
    outputs = {v.name: v for v in graph.outputs}
    for slot, value in (("key", keys), ("value", values)):
        concat = value.producer()
        if concat is None or concat.op_type != "Concat" or len(concat.inputs) != 2 or \
                concat.attributes.get_int("axis") not in (2, -2):
            return None
        past = concat.inputs[0]
        found = PAST.match(past.name or "")
        if not past.is_graph_input() or found is None or found.group(2) != slot or \
                outputs.get(f"present.{found.group(1)}.{slot}") is not value:
            return None
        if any(use.node is not concat and use.node.op_type != "Shape" for use in past.uses()):
            return None
        pasts.append(past)
        concats.append(concat)
    shapes = [v.shape for v in (query, concats[0].inputs[1], concats[1].inputs[1])]
    if any(s is None or len(s) != 4 or not isinstance(s[1], int) or not isinstance(s[3], int) for s in shapes):
        return None
    if not shapes[0][3] == shapes[1][3] == shapes[2][3] or shapes[1][1] != shapes[2][1] or shapes[0][1] % shapes[1][1]:
        return None
    return node, pasts, concats


def _lower(graph: ir.Graph, node: ir.Node, pasts, concats, seqlens_k, total32) -> None:
    query, mask = node.inputs[0], node.inputs[3] if len(node.inputs) > 3 else None
    heads, head_size = query.shape[1], query.shape[3]
    kv_heads = concats[0].inputs[1].shape[1]
    name = node.name or f"{pasts[0].name}.attention"
    tape = ir.tape.Tape()
    flat = _const(tape, [0, 0, -1])

    def tokens_major(x):  # [B, heads, S, D] -> [B, S, heads * D]
        return tape.op("Reshape", [tape.op("Transpose", [x], {"perm": [0, 2, 1, 3]}), flat])

    bias = mask
    if mask is not None and mask.dtype == ir.DataType.BOOL:
        bias = tape.op("Where", [mask, _const(tape, np.float32(0)), _const(tape, np.float32(-np.inf))])
    attributes = {"num_heads": heads, "kv_num_heads": kv_heads, "do_rotary": 0}
    if "scale" in node.attributes:
        attributes["scale"] = node.attributes.get_float("scale")
    if node.attributes.get_float("softcap", 0.0):
        attributes["softcap"] = node.attributes.get_float("softcap")
    out, *presents = tape.op_multi_out(
        "GroupQueryAttention",
        [tokens_major(query), tokens_major(concats[0].inputs[1]), tokens_major(concats[1].inputs[1]), *pasts,
         seqlens_k, total32, None, None, None, bias],
        attributes, num_outputs=3, domain="com.microsoft", name=f"{name}/GroupQueryAttention")
    result = tape.op("Transpose", [tape.op("Reshape", [out, _const(tape, [0, 0, heads, head_size])])],
                     {"perm": [0, 2, 1, 3]})
    ir.convenience.replace_nodes_and_values(graph, node, [node], _named(tape.nodes, name), node.outputs[:1],
                                            [result])
    for concat, present, past in zip(concats, presents, pasts):
        old = concat.outputs[0]
        graph.outputs[[i for i, v in enumerate(graph.outputs) if v is old][0]] = present
        graph.remove(concat, safe=True)
        present.name, present.type = old.name, past.type
        present.shape = ir.Shape([past.shape[0], past.shape[1], "present_sequence", past.shape[3]])


def _past_shape_from_mask(graph: ir.Graph, shape_node: ir.Node, past: ir.Value, past_tokens: ir.Value) -> None:
    """Shape(past)[start:end] with the token axis read as the attention mask's width less this step's
    tokens: a past buffer with room to spare must not change what the graph computes."""
    tape = ir.tape.Tape()
    whole = tape.op("Concat", [tape.op("Shape", [past], {"start": 0, "end": 2}), past_tokens,
                               tape.op("Shape", [past], {"start": 3, "end": 4})], {"axis": 0})
    sliced = tape.op("Slice", [whole, _const(tape, [shape_node.attributes.get_int("start", 0)]),
                               _const(tape, [shape_node.attributes.get_int("end", 4)])])
    nodes = _named(tape.nodes, shape_node.name or f"{past.name}.shape")
    ir.convenience.replace_nodes_and_values(graph, shape_node, [shape_node], nodes,
                                            shape_node.outputs, [sliced])


def _named(nodes: list[ir.Node], prefix: str) -> list[ir.Node]:
    """The nodes, their outputs named under `prefix`: an If subgraph elsewhere shares the graph's
    namespace, so names are not left to be assigned."""
    for i, node in enumerate(nodes):
        node.name = f"{prefix}/{node.op_type}_{i}"
        for j, value in enumerate(node.outputs):
            value.name = value.name or f"{node.name}:{j}"
    return nodes


def _const(tape: ir.tape.Tape, value) -> ir.Value:
    return tape.op("Constant", [], {"value": ir.tensor(np.asarray(value, np.int64) if isinstance(value, list)
                                                       else np.asarray(value))})
