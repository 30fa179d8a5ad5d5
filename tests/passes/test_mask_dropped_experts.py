"""MaskDroppedExpertsPass: a layer's router never selects the experts the plan drops."""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from graphs import moe_layers

from moec.errors import MoecError
from moec.passes.lower_moe import LowerMoEPass
from moec.passes.mask_dropped_experts import MaskDroppedExpertsPass, router_selections
from moec.passes.routing_attributes import RoutingAttributesPass


def _run(model, x):
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"x": x})))


def test_the_router_selects_only_the_remaining_experts_and_they_alone_are_computed():
    model = moe_layers([0, 1], experts=4, k=2)
    RoutingAttributesPass({1: {"dropped": (0, 2)}})(model)
    assert MaskDroppedExpertsPass()(model).modified
    layer_1 = next(n for n in model.graph if n.op_type == "Experts" and n.name.startswith("layers.1"))
    selection = router_selections(layer_1)
    assert [s.op_type for s in selection] == ["TopK"] and selection[0].inputs[0].producer().op_type == "Where"
    # the top-k indices of layer 1 come from experts 1 and 3 only: expose them as an output
    indices = selection[0].outputs[1]
    model.graph.outputs.append(indices)
    LowerMoEPass()(model)
    names = set(model.graph.initializers)
    assert "layers.1.experts.1.up_proj" in names and "layers.1.experts.0.up_proj" not in names
    assert "layers.1.experts.2.down_proj" not in names and "layers.0.experts.2.down_proj" in names
    x = np.random.default_rng(1).normal(size=(16, 8)).astype(np.float32)
    chosen = _run(model, x)[indices.name]
    assert sorted(np.unique(chosen)) == [1, 3]


def test_nothing_dropped_changes_nothing():
    model = moe_layers([0])
    assert not MaskDroppedExpertsPass()(model).modified


def test_a_router_without_a_top_k_over_the_experts_is_named():
    model = moe_layers([3], experts=4)
    RoutingAttributesPass({3: {"dropped": (1,)}})(model)
    top = next(n for n in model.graph if n.op_type == "TopK")
    top.attributes["axis"] = ir.AttrInt64("axis", 0)  # over tokens, not experts
    with pytest.raises(MoecError, match="layer 3: its router's selection"):
        MaskDroppedExpertsPass()(model)
