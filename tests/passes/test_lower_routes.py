"""LowerRoutesPass: each moec::Routes node → the layer's DynamicGating, or nothing where it does not
prune (the op's reference: tests/test_routes.py)."""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from graphs import moe_layers

from moec.ops.moe import ACTIVATIONS_OUTPUT, PRUNE_SWITCH, ExpertsSpec, stacked_reference
from moec.ops.routes import RoutesSpec, pruned_routes
from moec.passes.lower_moe import LowerMoEPass, is_moe_node, moe_spec
from moec.passes.lower_routes import LowerRoutesPass, is_routes_node
from moec.passes.routing_attributes import RoutingAttributesPass

PRUNING = {"beta": 0.7, "protect_fraction": 0.2, "keep_experts": (1,)}


def weights_of(model: ir.Model, layer: int) -> dict[str, np.ndarray]:
    inits = model.graph.initializers
    return {"router": inits[f"layers.{layer}.router.weight"].const_value.numpy(),
            "gate_up": inits[f"layers.{layer}.experts.gate_up_proj"].const_value.numpy(),
            "down": inits[f"layers.{layer}.experts.down_proj"].const_value.numpy()}


def expected(layers: dict, x: np.ndarray, pruned: set[int]) -> tuple[np.ndarray, int]:
    """moe_layers' computation in NumPy, the `pruned` layers' routing through the Routes reference:
    (output, routes computed)."""
    computed = 0
    for layer, w in layers.items():
        logits = x @ w["router"]
        index = np.argsort(-logits, axis=-1, kind="stable")[:, :2]
        top = np.take_along_axis(logits, index, -1)
        top = np.exp(top - top[:, :1])
        routing = top / top.sum(-1, keepdims=True)
        spec = RoutesSpec(layer, 4, **PRUNING) if layer in pruned else RoutesSpec(layer, 4)
        index, routing = pruned_routes(x, index, routing.astype(np.float32), spec)
        computed += int((index < 4).sum())
        x = stacked_reference(x, index, routing, w["gate_up"], w["down"], spec=ExpertsSpec(layer, sentinel=True))
    return x, computed


def run(model: ir.Model, x: np.ndarray, **feeds) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, {"x": x, **feeds})))


@pytest.mark.parametrize("tokens", [0, 1, 16])
def test_a_pruned_layer_routes_through_dynamic_gating_and_its_experts_skip_the_dropped_routes(tokens):
    model = moe_layers([0, 1], own_routes=True)
    layers = {layer: weights_of(model, layer) for layer in (0, 1)}
    RoutingAttributesPass({1: PRUNING})(model)
    assert LowerRoutesPass()(model).modified
    assert not any(is_routes_node(node) for node in model.graph)
    assert [n.op_type for n in model.graph if n.domain == "moec" and not is_moe_node(n)] == ["DynamicGating"]
    assert {moe_spec(n).layer: moe_spec(n).sentinel for n in model.graph if is_moe_node(n)} == {0: False, 1: True}
    assert PRUNE_SWITCH in [v.name for v in model.graph.inputs]
    LowerMoEPass()(model)
    x = np.random.default_rng(tokens).normal(scale=0.3, size=(tokens, 8)).astype(np.float32)
    got = run(model, x)
    want, computed = expected(layers, x, pruned={1})
    np.testing.assert_allclose(got["y"], want, rtol=1e-4, atol=1e-4)
    assert int(got[f"{ACTIVATIONS_OUTPUT}.0"]) + int(got[f"{ACTIVATIONS_OUTPUT}.1"]) == computed
    if tokens > 1:
        assert computed < 2 * 2 * tokens  # the rule dropped routes here
        off = run(model, x, **{PRUNE_SWITCH: np.array(False)})
        np.testing.assert_allclose(off["y"], expected(layers, x, pruned=set())[0], rtol=1e-4, atol=1e-4)


def test_routes_of_a_layer_that_does_not_prune_are_removed():
    model = moe_layers([0, 1], own_routes=True)
    layers = {layer: weights_of(model, layer) for layer in (0, 1)}
    assert LowerRoutesPass()(model).modified
    assert not any(is_routes_node(node) for node in model.graph)
    experts = [node for node in model.graph if is_moe_node(node)]
    assert [node.inputs[1].producer().op_type for node in experts] == ["TopK", "TopK"]
    assert not any(moe_spec(node).sentinel for node in experts)
    LowerMoEPass()(model)
    x = np.random.default_rng(4).normal(scale=0.3, size=(6, 8)).astype(np.float32)
    np.testing.assert_allclose(run(model, x)["y"], expected(layers, x, pruned=set())[0], rtol=1e-4, atol=1e-4)


def test_a_graph_without_routes_is_unchanged():
    assert not LowerRoutesPass()(moe_layers([0, 1])).modified


def test_routes_after_the_experts_lowering_are_a_precondition_error():
    model = moe_layers([0], own_routes=True)
    LowerMoEPass()(model)
    with pytest.raises(ir.passes.PreconditionError, match="before the experts lowering"):
        LowerRoutesPass()(model)
