"""LogitsToKeepPass: a `logits_to_keep` input that slices the head's input to the last positions."""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from graphs import initializer, model, value
from moec.ops.moe import LOGITS_TO_KEEP
from moec.passes.logits_to_keep import LogitsToKeepPass


def _head_graph(rank: int = 3) -> ir.Model:
    """hidden [B, S, 8] -> norm-like Mul -> MatMul with the head -> a softcap (Div, Tanh, Mul) -> logits."""
    rng = np.random.default_rng(0)
    hidden = value("hidden", ["B", "S", 8][3 - rank:])
    head = initializer("lm_head.weight", rng.normal(size=(8, 11)).astype(np.float32))
    scale = initializer("norm.weight", rng.normal(size=8).astype(np.float32))
    cap = initializer("cap", np.array(3.0, np.float32))
    normed = ir.node("Mul", [hidden, scale])
    logits = ir.node("MatMul", [normed.outputs[0], head])
    capped = ir.node("Div", [logits.outputs[0], cap])
    tanh = ir.node("Tanh", capped.outputs)
    out = ir.node("Mul", [tanh.outputs[0], cap])
    out.outputs[0].name = "logits"
    for node in (normed, logits, capped, tanh, out):
        node.outputs[0].dtype = ir.DataType.FLOAT
        node.outputs[0].shape = ir.Shape(["B", "S", 11 if node is not normed else 8][3 - rank:])
    return model([hidden], [normed, logits, capped, tanh, out], out.outputs, [head, scale, cap])


def _run(m: ir.Model, feeds: dict) -> np.ndarray:
    session = ort.InferenceSession(ir.to_proto(m).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


@pytest.mark.parametrize("keep", [0, 1, 2, 5, 100])
def test_the_last_positions_get_the_same_logits(keep):
    hidden = np.random.default_rng(1).normal(size=(2, 5, 8)).astype(np.float32)
    expected = _run(_head_graph(), {"hidden": hidden})
    lowered = _head_graph()
    assert LogitsToKeepPass()(lowered).modified
    assert [n.op_type for n in lowered.graph][:3] == ["Mul", "Reshape", "Neg"]
    np.testing.assert_array_equal(_run(lowered, {"hidden": hidden}), expected)  # not fed: every position
    got = _run(lowered, {"hidden": hidden, LOGITS_TO_KEEP: np.array(keep, np.int64)})
    np.testing.assert_array_equal(got, expected[:, -keep:] if keep else expected)


def test_a_graph_whose_logits_are_not_a_head_over_positions_is_left_alone():
    assert not LogitsToKeepPass()(_head_graph(rank=2)).modified
    x = value("x", ["B", "S", 8])
    node = ir.node("Relu", [x])
    node.outputs[0].name = "logits"
    unchanged = model([x], [node], node.outputs)
    assert not LogitsToKeepPass()(unchanged).modified
    assert LOGITS_TO_KEEP not in [v.name for v in unchanged.graph.inputs]
