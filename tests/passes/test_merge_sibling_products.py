"""MergeSiblingProductsPass: MatMulNBits reading the same activations become one, then a Split."""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from graphs import initializer, model, value
from moec.passes.matmul_nbits import MatMulNBitsPass
from moec.passes.merge_sibling_products import MergeSiblingProductsPass
from moec.quant import Quantizer


def _projections() -> ir.Model:
    """x feeds q [64, 32], k [64, 16], v [64, 16] and a 2-bit g [64, 8]; y (another input) feeds o."""
    rng = np.random.default_rng(0)
    x, y = value("x", ["M", 64]), value("y", ["M", 64])
    weights = {name: initializer(name, rng.normal(size=(64, n)).astype(np.float32))
               for name, n in (("q", 32), ("k", 16), ("v", 16), ("g", 8), ("o", 8))}
    nodes = [ir.node("MatMul", [y if name == "o" else x, w], name=f"{name}_proj") for name, w in weights.items()]
    for node, name in zip(nodes, weights):
        node.outputs[0].name = f"{name}_out"
    return model([x, y], nodes, [n.outputs[0] for n in nodes], list(weights.values()))


def _run(m: ir.Model, feeds) -> list[np.ndarray]:
    return ort.InferenceSession(ir.to_proto(m).SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def test_siblings_of_one_input_and_width_become_one_product():
    specs = {name: Quantizer(2 if name == "g" else 4, 32, 2 if name == "g" else 4) for name in "qkvgo"}
    feeds = {name: np.random.default_rng(1).normal(size=(3, 64)).astype(np.float32) for name in ("x", "y")}
    separate, merged = _projections(), _projections()
    for m in (separate, merged):
        MatMulNBitsPass(specs, accuracy_level=0)(m)
    assert MergeSiblingProductsPass()(merged).modified
    products = [n for n in merged.graph if n.op_type == "MatMulNBits"]
    assert sorted(n.attributes["N"].value for n in products) == [8, 8, 64]  # g and o alone, q+k+v
    assert "q+k+v.q" in merged.graph.initializers
    assert merged.graph.initializers["q+k+v.split"].const_value.numpy().tolist() == [32, 16, 16]
    assert [n.op_type for n in merged.graph].count("Split") == 1
    assert [v.name for v in merged.graph.outputs] == ["q_out", "k_out", "v_out", "g_out", "o_out"]
    for got, want in zip(_run(merged, feeds), _run(separate, feeds)):
        np.testing.assert_array_equal(got, want)
    assert not MergeSiblingProductsPass()(merged).modified
