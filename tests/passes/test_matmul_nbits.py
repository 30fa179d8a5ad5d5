"""MatMulNBitsPass: float weight products → com.microsoft.MatMulNBits at the widths given."""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from moec.passes.matmul_nbits import MatMulNBitsPass
from moec.quant import Quantizer, rtn
from moec.targets import get_target


def _product_graph(weight_nk: np.ndarray, gemm: bool, bias: np.ndarray | None) -> ir.Model:
    n, k = weight_nk.shape
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["M", k]))
    w = ir.Value(name="w", const_value=ir.tensor(weight_nk if gemm else weight_nk.T.copy(), name="w"))
    inits = [w]
    if gemm:
        inputs = [x, w]
        if bias is not None:
            inputs.append(ir.Value(name="c", const_value=ir.tensor(bias, name="c")))
            inits.append(inputs[-1])
        node = ir.node("Gemm", inputs, attributes={"transB": 1})
    else:
        node = ir.node("MatMul", [x, w])
    node.outputs[0].name = "y"
    graph = ir.Graph([x], node.outputs, nodes=[node], initializers=inits, opset_imports={"": 23})
    return ir.Model(graph, ir_version=10)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("k, group", [(64, 32), (200, 128), (96, 16)])
@pytest.mark.parametrize("form", ["matmul", "gemm", "gemm-bias"])
def test_matmul_nbits_computes_with_the_dequantized_weight(bits, k, group, form):
    rng = np.random.default_rng(bits * 1000 + k)
    weight = rng.normal(size=(24, k)).astype(np.float32)
    bias = rng.normal(size=24).astype(np.float32) if form == "gemm-bias" else None
    model = _product_graph(weight, gemm=form != "matmul", bias=bias)
    specs = {"w": Quantizer(bits, group, get_target("cpu").container_bits[bits])}
    assert MatMulNBitsPass(specs, accuracy_level=0)(model).modified
    assert [n.op_type for n in model.graph][0] == "MatMulNBits"
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.normal(size=(5, k)).astype(np.float32)
    expected = x @ rtn(weight, bits, group).dequantize().T + (0 if bias is None else bias)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], expected, rtol=1e-4, atol=1e-4)


def test_matmul_nbits_leaves_weights_without_a_spec():
    model = _product_graph(np.ones((4, 32), np.float32), gemm=False, bias=None)
    assert not MatMulNBitsPass({"another": Quantizer(4, 32, 4)})(model).modified
    assert [n.op_type for n in model.graph] == ["MatMul"]


def test_it_runs_only_after_the_experts_lowering():
    from graphs import moe_layers

    with pytest.raises(ir.passes.PreconditionError, match="after the experts lowering"):
        MatMulNBitsPass({})(moe_layers([0]))
