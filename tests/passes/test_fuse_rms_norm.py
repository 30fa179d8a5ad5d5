"""FuseRMSNormPass: RMSNorm (as torch.onnx writes it) → com.microsoft.SkipSimplifiedLayerNormalization."""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from graphs import initializer, model, value

from moec.passes.fuse_rms_norm import FuseRMSNormPass

EPSILON = 1e-6


def rms_norm(x: ir.Value, scale: ir.Value, nodes: list, constants: list) -> ir.Value:
    """x * rsqrt(mean(x^2) + eps) * scale, node by node as transformers' RMSNorm exports (after
    torch.onnx's optimizer made its constants initializers)."""
    two, eps, axes = (initializer(f"{x.name}.{name}", array) for name, array in
                      (("two", np.array(2.0, np.float32)), ("eps", np.array(EPSILON, np.float32)),
                       ("axes", np.array([-1], np.int64))))
    constants += [two, eps, axes]
    square = ir.node("Pow", [x, two])
    mean = ir.node("ReduceMean", [square.outputs[0], axes], attributes={"keepdims": 1, "noop_with_empty_axes": 0})
    shifted = ir.node("Add", [mean.outputs[0], eps])
    root = ir.node("Sqrt", [shifted.outputs[0]])
    inverse = ir.node("Reciprocal", [root.outputs[0]])
    normed = ir.node("Mul", [x, inverse.outputs[0]])
    scaled = ir.node("Mul", [scale, normed.outputs[0]])
    nodes += [square, mean, shifted, root, inverse, normed, scaled]
    return scaled.outputs[0]


def expected(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + EPSILON) * scale


def run(m: ir.Model, feeds: dict) -> np.ndarray:
    session = ort.InferenceSession(ir.to_proto(m).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


@pytest.mark.parametrize("shape", [["B", "S", 8], ["B", "S", 2, 8]], ids=["hidden", "per-head"])
def test_a_norm_without_a_residual_gets_a_zero_skip(shape):
    x = value("x", shape)
    scale = initializer("norm.weight", np.linspace(0.5, 1.5, 8, dtype=np.float32))
    nodes, constants = [], [scale]
    out = rms_norm(x, scale, nodes, constants)
    m = model([x], nodes, [out], constants, {"com.microsoft": 1})
    data = np.random.default_rng(0).normal(size=[2, 3, *shape[2:]]).astype(np.float32)
    assert FuseRMSNormPass()(m).modified
    fused = [n for n in m.graph if n.op_type == "SkipSimplifiedLayerNormalization"]
    assert len(fused) == 1 and fused[0].domain == "com.microsoft"
    assert not [n for n in m.graph if n.op_type in ("Pow", "ReduceMean", "Sqrt")]
    np.testing.assert_allclose(run(m, {"x": data}), expected(data, scale.const_value.numpy()), rtol=1e-5, atol=1e-5)


def test_an_opset_23_norm_fuses_in_a_model_that_imports_no_microsoft_domain():
    """moec.trace exports RMSNormalization nodes; a model whose norms no ORT rule fused (DeepSeek-V4's,
    in float32 around its hyper-connections) gets the domain its fused norms need."""
    x = value("x", ["B", "S", 8])
    scale = initializer("norm.weight", np.linspace(0.5, 1.5, 8, dtype=np.float32))
    norm = ir.node("RMSNormalization", [x, scale], attributes={"axis": -1, "epsilon": EPSILON})
    norm.outputs[0].name, norm.outputs[0].dtype = "normed", ir.DataType.FLOAT
    m = model([x], [norm], [norm.outputs[0]], [scale], {})
    data = np.random.default_rng(1).normal(size=[2, 3, 8]).astype(np.float32)
    assert FuseRMSNormPass()(m).modified and m.opset_imports["com.microsoft"] == 1
    assert [n.op_type for n in m.graph if n.domain == "com.microsoft"] == ["SkipSimplifiedLayerNormalization"]
    np.testing.assert_allclose(run(m, {"x": data}), expected(data, scale.const_value.numpy()), rtol=1e-5, atol=1e-5)


def test_a_norm_after_a_residual_add_takes_it_as_its_skip():
    x, residual = value("x", ["B", "S", 8]), value("residual", ["B", "S", 8])
    scale = initializer("norm.weight", np.linspace(0.5, 1.5, 8, dtype=np.float32))
    add = ir.node("Add", [x, residual])
    add.outputs[0].name, add.outputs[0].dtype = "sum", ir.DataType.FLOAT
    nodes, constants = [add], [scale]
    out = rms_norm(add.outputs[0], scale, nodes, constants)
    m = model([x, residual], nodes, [out], constants, {"com.microsoft": 1})
    assert FuseRMSNormPass()(m).modified
    assert [n.op_type for n in m.graph] == ["SkipSimplifiedLayerNormalization"]
    rng = np.random.default_rng(1)
    a, b = (rng.normal(size=(2, 3, 8)).astype(np.float32) for _ in range(2))
    np.testing.assert_allclose(run(m, {"x": a, "residual": b}), expected(a + b, scale.const_value.numpy()),
                               rtol=1e-5, atol=1e-5)


def test_a_norm_scaled_per_row_is_scaled_after_the_fused_norm():
    """Ergo norms each route's output by its expert: the scale is a Gather of one row a route, which
    the fused op cannot take (its gamma is one vector); it multiplies the fused norm's output."""
    x, rows = value("x", ["N", 8]), value("expert", ["N"], ir.DataType.INT64)
    bank = initializer("norm.weight", np.random.default_rng(2).uniform(0.5, 1.5, (3, 8)).astype(np.float32))
    gather = ir.node("Gather", [bank, rows])
    gather.outputs[0].name, gather.outputs[0].dtype = "scale", ir.DataType.FLOAT
    gather.outputs[0].shape = ir.Shape(["N", 8])
    nodes, constants = [gather], [bank]
    out = rms_norm(x, gather.outputs[0], nodes, constants)
    m = model([x, rows], nodes, [out], constants, {"com.microsoft": 1})
    assert FuseRMSNormPass()(m).modified
    assert [n.op_type for n in m.graph if n.domain == "com.microsoft"] == ["SkipSimplifiedLayerNormalization"]
    rng = np.random.default_rng(3)
    data, experts = rng.normal(size=(5, 8)).astype(np.float32), np.array([2, 0, 1, 2, 0])
    np.testing.assert_allclose(run(m, {"x": data, "expert": experts}),
                               expected(data, bank.const_value.numpy()[experts]), rtol=1e-5, atol=1e-5)


def test_a_graph_without_a_norm_is_unchanged():
    x = value("x", ["B", 8])
    node = ir.node("Relu", [x])
    assert not FuseRMSNormPass()(model([x], [node], node.outputs)).modified
