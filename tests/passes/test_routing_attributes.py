"""RoutingAttributesPass: the plan's routing changes (pruning, super experts, dropped experts) onto
the Experts nodes of the layers it names, the pruning onto a layer's Routes node where it has one."""

import onnx_ir as ir
import pytest
from graphs import moe_layers

from moec.ops.routes import RoutesSpec
from moec.passes.lower_moe import moe_spec
from moec.passes.lower_routes import is_routes_node, routes_spec
from moec.passes.routing_attributes import RoutingAttributesPass


def specs(model):
    return {moe_spec(node).layer: moe_spec(node) for node in model.graph if node.op_type == "Experts"}


def test_sets_the_named_attributes_on_the_named_layers_only():
    model = moe_layers([0, 1, 2])
    routing = {1: {"beta": 0.25, "protect_fraction": 0.1, "keep_experts": (2,)}, 2: {"top_p": 0.75, "dropped": (0, 3)}}
    assert RoutingAttributesPass(routing)(model).modified
    got = specs(model)
    assert (got[1].beta, round(got[1].protect_fraction, 6), got[1].keep_experts, got[1].top_p) == (0.25, 0.1, (2,), 1.0)
    assert (got[2].top_p, got[2].dropped, got[2].beta) == (0.75, (0, 3), 0.0)
    assert got[0] == moe_spec(next(n for n in moe_layers([0]).graph if n.op_type == "Experts"))


def test_no_routing_change_changes_nothing():
    model = moe_layers([0, 1])
    assert not RoutingAttributesPass({})(model).modified
    assert all(not spec.prunes and not spec.dropped for spec in specs(model).values())


def test_a_layer_without_an_experts_node_is_a_precondition_error():
    with pytest.raises(ir.passes.PreconditionError, match=r"layers \[5\] have no Experts node"):
        RoutingAttributesPass({5: {"beta": 0.5}})(moe_layers([0, 1]))


def test_a_layer_that_routes_for_itself_takes_its_pruning_on_its_routes_node():
    """Its Experts node keeps what is not pruning (dropped experts); a layer without a Routes node
    takes everything on its Experts node."""
    model = moe_layers([0, 1], own_routes=True)
    routing = {1: {"beta": 0.25, "protect_fraction": 0.1, "keep_experts": (2,), "dropped": (3,)}}
    assert RoutingAttributesPass(routing)(model).modified
    routes = {routes_spec(node).layer: routes_spec(node) for node in model.graph if is_routes_node(node)}
    assert routes[1].beta == 0.25 and routes[1].keep_experts == (2,) and round(routes[1].protect_fraction, 6) == 0.1
    assert routes[0] == RoutesSpec(0, 4)
    got = specs(model)
    assert got[1].dropped == (3,) and not got[1].prunes and got[1].keep_experts == () and got[0].dropped == ()
