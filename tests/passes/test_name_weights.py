"""NameWeightsPass: weights and their nodes named after the torch module they came from."""

import numpy as np
import onnx_ir as ir
from graphs import initializer, model, value

from moec.passes.name_weights import SCOPES_KEY, NameWeightsPass


def product(weight_name: str, scopes: str | None) -> ir.Model:
    x = value("x", ["M", 4])
    w = initializer(weight_name, np.ones((4, 3), np.float32))
    node = ir.node("MatMul", [x, w], name="node_MatMul_7")
    if scopes is not None:
        node.metadata_props[SCOPES_KEY] = scopes
    return model([x], [node], node.outputs, [w])


def test_a_folded_weight_takes_its_module_path_and_the_node_is_named_after_it():
    m = product("val_134", "['', 'model.model.layers.0.mlp.up_proj', 'linear']")
    assert NameWeightsPass(strip_prefix="model.")(m).modified
    assert list(m.graph.initializers) == ["model.layers.0.mlp.up_proj.weight"]
    assert m.graph.node(0).name == "model.layers.0.mlp.up_proj/MatMul"


def test_a_weight_already_under_its_module_keeps_its_name_less_the_wrapper_prefix():
    m = product("model.model.layers.0.mlp.up_proj.weight", "['', 'model.model.layers.0.mlp.up_proj', 'linear']")
    assert NameWeightsPass(strip_prefix="model.")(m).modified
    assert list(m.graph.initializers) == ["model.layers.0.mlp.up_proj.weight"]


def test_nodes_without_torch_scopes_are_left_alone():
    m = product("val_134", None)
    assert not NameWeightsPass(strip_prefix="model.")(m).modified
    assert list(m.graph.initializers) == ["val_134"] and m.graph.node(0).name == "node_MatMul_7"
