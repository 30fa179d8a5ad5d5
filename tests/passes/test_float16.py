"""Float16Pass: the graph in float16, the routers and the routed experts' weights as they were."""

import numpy as np
import pytest
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


def _if(flag: ir.Value, read: ir.Value, name: str, nested: bool) -> tuple[ir.Node, list[ir.Graph]]:
    """An If whose then branch negates `read` and whose else branch passes it on, both reading it from
    the graph around them; `nested`: the then branch does so through an If of its own."""
    branches, leaves = {}, []
    for branch, op_type in (("then_branch", "Neg"), ("else_branch", "Identity")):
        if nested and branch == "then_branch":
            inner, graphs = _if(flag, read, f"{name}/{branch}/if", nested=False)
            leaves += graphs
        else:
            inner = ir.node(op_type, [read], name=f"{name}/{branch}/{op_type}")
            leaves.append(None)
        inner.outputs[0].dtype, inner.outputs[0].shape = FLOAT, ir.Shape(["M", 2])
        inner.outputs[0].name = f"{name}/{branch}_y"
        branches[branch] = ir.Graph([], inner.outputs, nodes=[inner], name=f"{name}/{branch}")
        if leaves[-1] is None:
            leaves[-1] = branches[branch]
    node = ir.node("If", [flag], attributes={k: ir.AttrGraph(k, g) for k, g in branches.items()}, name=name)
    node.outputs[0].dtype, node.outputs[0].shape, node.outputs[0].name = FLOAT, ir.Shape(["M", 2]), f"{name}_y"
    return node, leaves


@pytest.mark.parametrize("nested", [False, True], ids=["if", "if-in-an-if"])
def test_an_if_whose_branches_read_the_graph_around_them_reads_float32_through_a_cast(nested):
    """The delta rule's If (moec/linear_attention.py) keeps its float32 branches, which read the
    rule's inputs from the graph around them, not as the If's inputs (the chunked branch through an
    If of its own, which picks the chunk's form): they read them through a Cast to float32, and the
    whole graph runs in onnxruntime."""
    import onnxruntime as ort
    from graphs import model, value

    x, flag = value("x", ["M", 2]), value("flag", [], ir.DataType.BOOL)
    hidden = ir.node("Relu", [x], name="relu")
    hidden.outputs[0].dtype, hidden.outputs[0].name = FLOAT, "hidden"
    choose, leaves = _if(flag, hidden.outputs[0], "if", nested)
    m = model([x, flag], [hidden, choose], choose.outputs)
    assert Float16Pass()(m).modified
    assert x.dtype == hidden.outputs[0].dtype == FLOAT16
    for graph in leaves:
        read = graph[0].inputs[0]
        assert read.dtype == FLOAT and read.producer().op_type == "Cast"
        assert read.producer().inputs[0] is hidden.outputs[0]
    session = ort.InferenceSession(ir.to_proto(m).SerializeToString(), providers=["CPUExecutionProvider"])
    data = np.array([[1.5, -2.0]], np.float16)
    for taken, expected in ((True, [[-1.5, 0.0]]), (False, [[1.5, 0.0]])):
        np.testing.assert_array_equal(session.run(None, {"x": data, "flag": np.array(taken)})[0], expected)


def test_a_state_read_by_a_loop_and_a_dead_identity_stays_float32():
    """The recurrent state a linear-attention If carries stays float32 (graph input and all), also
    where the optimizer left a dead Identity reading it (as it does where an If nested in the delta
    rule's If reads the state)."""
    from graphs import model, value

    state, flag = value("state", ["M", 2]), value("flag", [], ir.DataType.BOOL)
    dead = ir.node("Identity", [state], name="clone")
    dead.outputs[0].dtype, dead.outputs[0].name = FLOAT, "clone"
    choose, _ = _if(flag, state, "if", nested=True)
    m = model([state, flag], [dead, choose], choose.outputs)
    Float16Pass()(m)
    assert state.dtype == FLOAT and choose.outputs[0].dtype == FLOAT
