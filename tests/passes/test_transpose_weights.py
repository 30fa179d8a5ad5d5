"""TransposeWeightsPass: Transpose(initializer) folded into a lazily transposed initializer."""

import numpy as np
import onnx_ir as ir
from graphs import initializer, model, value

from moec.passes.transpose_weights import TransposeWeightsPass


def linear(weight: np.ndarray, shared: bool = False) -> ir.Model:
    """x @ W^T as torch.onnx writes an nn.Linear: MatMul(x, Transpose(W)); `shared`: W also
    feeds a Gather (a tied embedding)."""
    x = value("x", ["M", weight.shape[1]])
    w = initializer("w", weight)
    t = ir.node("Transpose", [w], attributes={"perm": [1, 0]})
    matmul = ir.node("MatMul", [x, t.outputs[0]])
    nodes, outputs = [t, matmul], [matmul.outputs[0]]
    if shared:
        ids = value("ids", ["M"], ir.DataType.INT64)
        gather = ir.node("Gather", [w, ids])
        nodes.append(gather)
        outputs.append(gather.outputs[0])
        return model([x, ids], nodes, outputs, [w])
    return model([x], nodes, outputs, [w])


def test_a_weights_only_transpose_becomes_the_weight_transposed_under_its_name():
    weight = np.arange(12, dtype=np.float32).reshape(3, 4)
    m = linear(weight)
    assert TransposeWeightsPass()(m).modified
    assert [n.op_type for n in m.graph] == ["MatMul"]
    folded = m.graph.initializers["w"]
    assert isinstance(folded.const_value, ir.LazyTensor) and list(folded.shape) == [4, 3]
    np.testing.assert_array_equal(folded.const_value.numpy(), weight.T)
    assert m.graph.node(0).inputs[1] is folded
    assert not TransposeWeightsPass()(m).modified  # nothing left to fold


def test_a_shared_weight_keeps_its_name_and_the_transposed_copy_gets_an_exporter_name():
    weight = np.arange(12, dtype=np.float32).reshape(3, 4)
    m = linear(weight, shared=True)
    assert TransposeWeightsPass()(m).modified
    assert set(m.graph.initializers) == {"w", "val_w_transposed"}
    np.testing.assert_array_equal(m.graph.initializers["val_w_transposed"].const_value.numpy(), weight.T)
    assert [n.op_type for n in m.graph] == ["MatMul", "Gather"]


def test_a_transpose_of_an_activation_is_left_alone():
    x = value("x", [3, 4])
    t = ir.node("Transpose", [x], attributes={"perm": [1, 0]})
    m = model([x], [t], t.outputs)
    assert not TransposeWeightsPass()(m).modified
    assert [n.op_type for n in m.graph] == ["Transpose"]
