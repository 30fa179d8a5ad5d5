"""GatherBlockQuantizedPass: embedding lookups → com.microsoft.GatherBlockQuantized at the plan's width."""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from moec.passes.gather_block_quantized import GatherBlockQuantizedPass
from moec.quant import Quantizer, rtn


def _lookup_graph(table: np.ndarray, axis: int = 0) -> ir.Model:
    ids = ir.Value(name="ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["B", "S"]))
    w = ir.Value(name="embed.weight", const_value=ir.tensor(table, name="embed.weight"))
    node = ir.node("Gather", [w, ids], attributes={"axis": axis})
    node.outputs[0].name = "y"
    graph = ir.Graph([ids], node.outputs, nodes=[node], initializers=[w], opset_imports={"": 23})
    return ir.Model(graph, ir_version=10)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_rows_come_back_as_the_quantizer_dequantizes_them(bits):
    table = np.random.default_rng(bits).normal(size=(50, 64)).astype(np.float32)
    model = _lookup_graph(table)
    assert GatherBlockQuantizedPass({"embed.weight": Quantizer(bits, 32, bits)})(model).modified
    assert [n.op_type for n in model.graph] == ["GatherBlockQuantized"]
    assert model.graph.initializers["embed.weight.q"].const_value.shape == ir.Shape([50, 64 * bits // 8])
    ids = np.array([[0, 49, 7], [7, 3, 0]], np.int64)
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    expected = rtn(table, bits, 32).dequantize()[ids]
    np.testing.assert_allclose(session.run(None, {"ids": ids})[0], expected, rtol=1e-6, atol=1e-6)


def test_tables_without_a_spec_or_gathered_across_stay_float_and_partial_blocks_are_refused():
    spec = {"embed.weight": Quantizer(8, 32, 8)}
    for model, specs in ((_lookup_graph(np.ones((50, 64), np.float32)), {}),
                         (_lookup_graph(np.ones((64, 50), np.float32), axis=1), spec)):
        assert not GatherBlockQuantizedPass(specs)(model).modified
        assert [n.op_type for n in model.graph] == ["Gather"]
    with pytest.raises(ValueError, match="rows of 48 are no whole number of blocks of 32"):
        GatherBlockQuantizedPass(spec)(_lookup_graph(np.ones((50, 48), np.float32)))


def test_the_policy_offers_only_tables_of_whole_groups():
    """gpt-oss's hidden size 2880 is no whole number of 128-groups: its table stays float."""
    from moec.policy import product_weights

    for width, group, offered in ((64, 32, True), (48, 32, False), (2880, 128, False), (2880, 64, True)):
        names = product_weights(_lookup_graph(np.ones((10, width), np.float32)), embedding_group=group)
        assert (names == ["embed.weight"]) == offered
    assert product_weights(_lookup_graph(np.ones((10, 64), np.float32))) == []  # a target that keeps tables float
