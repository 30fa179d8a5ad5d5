"""RoutingAttributesPass: the plan's routing changes (pruning, super experts, dropped experts) onto
the Experts nodes of the layers it names."""

import onnx_ir as ir
import pytest
from graphs import moe_layers

from moec.passes.lower_moe import moe_spec
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
