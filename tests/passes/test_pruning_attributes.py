"""PruningAttributesPass: the plan's pruning parameters onto the Experts nodes of the layers it names."""

import onnx_ir as ir
import pytest
from graphs import moe_layers

from moec.passes.lower_moe import moe_spec
from moec.passes.pruning_attributes import PruningAttributesPass


def specs(model):
    return {moe_spec(node).layer: moe_spec(node) for node in model.graph if node.op_type == "Experts"}


def test_sets_beta_and_protect_fraction_on_the_named_layers_only():
    model = moe_layers([0, 1, 2])
    assert PruningAttributesPass({1: (0.25, 0.1)})(model).modified
    got = specs(model)
    assert (got[1].beta, round(got[1].protect_fraction, 6)) == (0.25, 0.1)
    assert got[0].beta == got[2].beta == 0.0 and got[0].protect_fraction == got[2].protect_fraction == 0.0


def test_no_pruned_layer_changes_nothing():
    model = moe_layers([0, 1])
    assert not PruningAttributesPass({})(model).modified
    assert all(spec.beta == 0.0 for spec in specs(model).values())


def test_a_layer_without_an_experts_node_is_a_precondition_error():
    with pytest.raises(ir.passes.PreconditionError, match=r"layers \[5\] have no Experts node"):
        PruningAttributesPass({5: (0.5, 0.0)})(moe_layers([0, 1]))
