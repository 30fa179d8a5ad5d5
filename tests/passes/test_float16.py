"""Float16Pass: the graph in float16, the routers and the routed experts' weights as they were."""

import numpy as np
import onnx_ir as ir
from graphs import moe_layers

from moec.passes.float16 import Float16Pass

FLOAT, FLOAT16 = ir.DataType.FLOAT, ir.DataType.FLOAT16


def test_activations_go_float16_while_the_router_and_the_expert_weights_keep_theirs():
    model = moe_layers([0])
    before = model.graph.initializers["layers.0.router.weight"].const_value.numpy().copy()
    assert Float16Pass()(model).modified
    graph = model.graph
    assert graph.inputs[0].dtype == graph.outputs[0].dtype == FLOAT16
    assert graph.initializers["layers.0.router.weight"].dtype == FLOAT  # routing stays float32
    np.testing.assert_array_equal(graph.initializers["layers.0.router.weight"].const_value.numpy(), before)
    assert graph.initializers["layers.0.experts.gate_up_proj"].dtype == FLOAT  # the experts' stored dtype
    router = next(n for n in graph if n.name == "layers.0.router/MatMul")
    cast = router.inputs[0].producer()
    assert cast.op_type == "Cast" and cast.attributes["to"].value == FLOAT and cast.inputs[0] is graph.inputs[0]
    experts = next(n for n in graph if n.op_type == "Experts")
    assert experts.inputs[0] is graph.inputs[0] and experts.outputs[0].dtype == FLOAT16
    assert experts.inputs[2].dtype == FLOAT  # top_k_weights from the float32 router


def test_a_float_weight_off_the_routing_is_converted_when_written():
    from graphs import initializer, model, value

    x = value("x", ["M", 2])
    w = initializer("w", np.array([[1.0, 70000.0], [0.5, -2.0]], np.float32))
    node = ir.node("MatMul", [x, w])
    node.outputs[0].dtype = FLOAT
    m = model([x], [node], node.outputs, [w])
    assert Float16Pass()(m).modified
    converted = m.graph.initializers["w"]
    assert converted.dtype == FLOAT16 and isinstance(converted.const_value, ir.LazyTensor)
    assert converted.const_value.numpy()[0, 1] == np.finfo(np.float16).max  # saturated, not inf
    assert node.outputs[0].dtype == FLOAT16


def test_a_graph_without_float32_is_unchanged():
    from graphs import model, value

    ids = value("ids", ["M"], ir.DataType.INT64)
    node = ir.node("Neg", [ids])
    node.outputs[0].dtype = ir.DataType.INT64
    assert not Float16Pass()(model([ids], [node], node.outputs)).modified
