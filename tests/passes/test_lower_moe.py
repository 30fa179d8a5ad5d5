"""LowerMoEPass: each moec::Experts node → its experts' own products (the numerics of every
layout and activation: tests/test_moe_op.py)."""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from graphs import moe_layers

from moec.ops.moe import PRUNE_SWITCH, ExpertsSpec, expert_weight_name, stacked_reference
from moec.passes.lower_moe import LowerMoEPass
from moec.passes.routing_attributes import RoutingAttributesPass


def test_experts_nodes_become_per_expert_weights_and_compute_the_same():
    model = moe_layers([0, 1])
    stacked = {name: v.const_value.numpy().copy() for name, v in model.graph.initializers.items()}
    assert LowerMoEPass()(model).modified
    graph = model.graph
    assert not [n for n in graph if n.domain == "moec"]
    names = set(graph.initializers)
    assert {expert_weight_name(layer, e, p) for layer in (0, 1) for e in range(4) for p in ("gate", "up", "down")} \
        <= names
    # the stacked weights are read no more (RemoveUnusedNodesPass drops them afterwards)
    assert not graph.initializers["layers.0.experts.gate_up_proj"].uses()
    assert not graph.initializers["layers.1.experts.down_proj"].uses()
    x = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    expected = x
    for layer in (0, 1):
        logits = expected @ stacked[f"layers.{layer}.router.weight"]
        index = np.argsort(-logits, axis=-1)[:, :2]
        top = np.take_along_axis(logits, index, -1)
        weights = np.exp(top - top.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        expected = stacked_reference(expected, index, weights, stacked[f"layers.{layer}.experts.gate_up_proj"],
                                     stacked[f"layers.{layer}.experts.down_proj"], spec=ExpertsSpec(layer=layer))
    np.testing.assert_allclose(session.run(None, {"x": x})[0], expected, rtol=1e-4, atol=1e-4)


def test_many_tokens_on_two_threads_compute_the_same_in_every_session():
    """A prefill of 1024 tokens, each in 2 experts' outputs, summed on 2 threads: onnxruntime's
    ScatterND adding repeated indices raced there (wrong in 17 of 100 runs)."""
    model = moe_layers([0], hidden=128, inter=32)
    stacked = {name: v.const_value.numpy().copy() for name, v in model.graph.initializers.items()}
    LowerMoEPass()(model)
    proto = ir.to_proto(model).SerializeToString()
    x = np.random.default_rng(2).normal(size=(1024, 128)).astype(np.float32)
    logits = x @ stacked["layers.0.router.weight"]
    index = np.argsort(-logits, axis=-1, kind="stable")[:, :2]
    top = np.take_along_axis(logits, index, -1)
    weights = np.exp(top - top.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    expected = stacked_reference(x, index, weights, stacked["layers.0.experts.gate_up_proj"],
                                 stacked["layers.0.experts.down_proj"], spec=ExpertsSpec(layer=0))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    for _ in range(40):
        session = ort.InferenceSession(proto, options, providers=["CPUExecutionProvider"])
        for _ in range(3):
            np.testing.assert_allclose(session.run(None, {"x": x})[0], expected, rtol=1e-3, atol=1e-3)


def test_a_pruned_layer_gets_dynamic_gating_and_the_run_time_switch():
    model = moe_layers([0, 1])
    RoutingAttributesPass({1: {"beta": 0.5}})(model)
    assert LowerMoEPass()(model).modified
    assert [n.op_type for n in model.graph if n.domain == "moec"] == ["DynamicGating"]
    assert PRUNE_SWITCH in [v.name for v in model.graph.inputs]


def test_many_experts_compute_in_if_subgraphs():
    model = moe_layers([0])
    assert LowerMoEPass(experts_per_subgraph=2)(model).modified
    assert [n.op_type for n in model.graph].count("If") == 2  # 4 experts, 2 a subgraph


def test_a_graph_without_experts_is_unchanged():
    from graphs import model as build, value

    x = value("x", ["T", 4])
    node = ir.node("Relu", [x])
    assert not LowerMoEPass()(build([x], [node], node.outputs)).modified
