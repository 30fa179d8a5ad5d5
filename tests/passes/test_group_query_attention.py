"""GroupQueryAttentionPass on a hand-built attention layer: opset 23 Attention over a concatenated
KV cache, with a causal and padding mask built from the past's length, as moec.trace exports it."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from graphs import model, value
from moec.passes.group_query_attention import GroupQueryAttentionPass

BATCH, HEADS, KV_HEADS, HEAD = 2, 4, 2, 8
INT64 = ir.DataType.INT64


def _const(array):
    return ir.node("Constant", [], attributes={"value": ir.tensor(np.asarray(array))})


def attention_layer(extra_past_reader: bool = False) -> ir.Model:
    """present = Concat(past, new); the mask [B, 1, S, T]: key j is visible to query i if it is real
    (attention_mask) and j <= past + i, the past's length read off its shape."""
    ids, mask = value("input_ids", ["batch", "sequence"], INT64), value("attention_mask", ["batch", "total"], INT64)
    q = value("q", ["batch", HEADS, "sequence", HEAD])
    k, v = (value(n, ["batch", KV_HEADS, "sequence", HEAD]) for n in ("k", "v"))
    past_k, past_v = (value(f"past_key_values.0.{s}", ["batch", KV_HEADS, "past", HEAD]) for s in ("key", "value"))
    nodes = []

    def add(op, inputs, **attributes):
        nodes.append(ir.node(op, inputs, attributes=attributes))
        return nodes[-1].outputs[0]

    present_k = add("Concat", [past_k, k], axis=2)
    present_v = add("Concat", [past_v, v], axis=-2)
    present_k.name, present_v.name = "present.0.key", "present.0.value"
    zero, one, first = (nodes.append(_const(c)) or nodes[-1].outputs[0] for c in (np.int64(0), np.int64(1), [0]))
    past_len = add("Squeeze", [add("Shape", [past_k], start=2, end=3)])
    step = add("Squeeze", [add("Shape", [q], start=2, end=3)])
    keys = add("Range", [zero, add("Add", [past_len, step]), one])
    queries = add("Add", [add("Range", [zero, step, one]), past_len])
    causal = add("LessOrEqual", [add("Unsqueeze", [keys, first]), add("Unsqueeze", [queries, add("Constant", [],
                                 value=ir.tensor(np.array([1])))])])
    real = add("Unsqueeze", [add("Cast", [mask], to=ir.DataType.BOOL), add("Constant", [], value=ir.tensor(
        np.array([1, 2])))])
    visible = add("And", [causal, real])
    visible.type = ir.TensorType(ir.DataType.BOOL)
    out = add("Attention", [q, present_k, present_v, visible], scale=0.3)
    out.name = "out"
    outputs = [out, present_k, present_v]
    if extra_past_reader:  # the past read by something other than a Shape: not matched
        outputs.append(add("ReduceSum", [past_k]))
    return model([ids, mask, q, k, v, past_k, past_v], nodes, outputs)


def _session(m: ir.Model) -> ort.InferenceSession:
    return ort.InferenceSession(ir.to_proto(m).SerializeToString(), providers=["CPUExecutionProvider"])


def _steps(seed=0):
    """Three steps of a left-padded batch (row 1 has two pads): prompt of 3, then 1, then 1 token."""
    rng = np.random.default_rng(seed)
    mask = np.array([[1, 1, 1], [0, 0, 1]], np.int64)
    for tokens in (3, 1, 1):
        if tokens == 1:
            mask = np.concatenate([mask, np.ones((BATCH, 1), np.int64)], axis=1)
        yield mask, {"input_ids": np.zeros((BATCH, tokens), np.int64), "attention_mask": mask,
                     **{n: rng.standard_normal((BATCH, h, tokens, HEAD)).astype(np.float32)
                        for n, h in (("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS))}}


def test_lowers_to_one_group_query_attention_that_concatenates_or_appends_in_place():
    original = attention_layer()
    lowered = attention_layer()
    assert GroupQueryAttentionPass()(lowered).modified
    ops = [n.op_type for n in lowered.graph]
    assert ops.count("GroupQueryAttention") == 1 and "Attention" not in ops and "Concat" in ops  # Concat: shapes
    assert not any(n.op_type == "Concat" and n.inputs[0].name.startswith("past_key") for n in lowered.graph)
    reference, fused = _session(original), _session(lowered)
    empty = np.zeros((BATCH, KV_HEADS, 0, HEAD), np.float32)
    past = {"past_key_values.0.key": empty, "past_key_values.0.value": empty}
    # the buffer: room for all 5 tokens and 3 more, bound as both past and present
    buffers = {name: ort.OrtValue.ortvalue_from_numpy(np.zeros((BATCH, KV_HEADS, 8, HEAD), np.float32))
               for name in past}
    for mask, feeds in _steps():
        expected, *presents = reference.run(None, feeds | past)
        concatenated = fused.run(None, feeds | past)
        binding = fused.io_binding()
        binding.bind_output("out")
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        for name, buffer in buffers.items():
            binding.bind_ortvalue_input(name, buffer)
            binding.bind_ortvalue_output("present." + name.removeprefix("past_key_values."), buffer)
        fused.run_with_iobinding(binding)
        in_place = binding.get_outputs()[0].numpy()
        real = mask[:, -feeds["q"].shape[2]:].astype(bool)  # a padded query's output has no meaning
        for got in (concatenated[0], in_place):
            np.testing.assert_allclose(got.transpose(0, 2, 1, 3)[real], expected.transpose(0, 2, 1, 3)[real],
                                       atol=1e-5)
        total = mask.shape[1]
        for present, got, buffer in zip(presents, concatenated[1:], buffers.values()):
            np.testing.assert_array_equal(got, present)
            np.testing.assert_array_equal(buffer.numpy()[:, :, :total], present)
        past = dict(zip(past, presents))


def test_a_past_read_by_other_nodes_is_left_alone():
    m = attention_layer(extra_past_reader=True)
    assert not GroupQueryAttentionPass()(m).modified
    assert [n.op_type for n in m.graph].count("Attention") == 1


@pytest.mark.parametrize("rename", ["attention_mask", "present.0.key"])
def test_needs_the_mask_input_and_the_present_output(rename):
    m = attention_layer()
    target = next(v for v in [*m.graph.inputs, *m.graph.outputs] if v.name == rename)
    target.name = rename + "_renamed"
    assert not GroupQueryAttentionPass()(m).modified
