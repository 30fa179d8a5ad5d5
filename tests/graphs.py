"""Graphs built by hand for the passes' own tests (onnx-ir's style: ir.node, ir.Graph)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from moec.ops.moe import DOMAIN, INPUT_NAMES, OP_TYPE, ExpertsSpec
from moec.ops.routes import OP_TYPE as ROUTES_OP_TYPE
from moec.ops.routes import RoutesSpec

FLOAT = ir.DataType.FLOAT


def value(name: str, shape: list, dtype: ir.DataType = FLOAT) -> ir.Value:
    return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape))


def initializer(name: str, array: np.ndarray) -> ir.Value:
    tensor = ir.tensor(array, name=name)
    return ir.Value(name=name, const_value=tensor, type=ir.TensorType(tensor.dtype), shape=tensor.shape)


def model(inputs, nodes, outputs, initializers=(), opsets=None) -> ir.Model:
    graph = ir.Graph(inputs, outputs, nodes=nodes, initializers=initializers,
                     opset_imports={"": 23, **(opsets or {})})
    return ir.Model(graph, ir_version=10)


def moe_layers(layers: list[int], hidden: int = 8, inter: int = 6, experts: int = 4, k: int = 2,
               seed: int = 0, own_routes: bool = False) -> ir.Model:
    """A graph of sparse layers in a row, each a router (MatMul → TopK → Softmax) feeding one
    moec::Experts node, concatenated gate/up weights as initializers; with `own_routes`, through a
    moec::Routes node (as an experts module that routes for itself is traced)."""
    rng = np.random.default_rng(seed)
    x = value("x", ["T", hidden])
    nodes, inits, current = [], [], x
    for layer in layers:
        router = initializer(f"layers.{layer}.router.weight", rng.normal(size=(hidden, experts)).astype(np.float32))
        gate_up = initializer(f"layers.{layer}.experts.gate_up_proj",
                              rng.normal(size=(experts, 2 * inter, hidden)).astype(np.float32))
        down = initializer(f"layers.{layer}.experts.down_proj", rng.normal(size=(experts, hidden, inter)).astype(np.float32))
        inits += [router, gate_up, down]
        k_value = initializer(f"layers.{layer}.k", np.array([k], np.int64))
        inits.append(k_value)
        logits = ir.node("MatMul", [current, router], name=f"layers.{layer}.router/MatMul")
        top = ir.node("TopK", [logits.outputs[0], k_value], num_outputs=2, name=f"layers.{layer}.router/TopK")
        weights = ir.node("Softmax", [top.outputs[0]], attributes={"axis": -1}, name=f"layers.{layer}.router/Softmax")
        routing = [top.outputs[1], weights.outputs[0]]
        if own_routes:
            routes = ir.node(ROUTES_OP_TYPE, [current, *routing], attributes=RoutesSpec(layer, experts).attributes(),
                             domain=DOMAIN, num_outputs=2, name=f"layers.{layer}.routes")
            for out, dtype in zip(routes.outputs, (ir.DataType.INT64, FLOAT)):
                out.dtype, out.shape = dtype, ir.Shape(["T", k])
            routing = list(routes.outputs)
        inputs = {"hidden": current, "top_k_index": routing[0], "top_k_weights": routing[1],
                  "gate_up": gate_up, "down": down}
        experts_node = ir.node(OP_TYPE, [inputs.get(name) for name in INPUT_NAMES[:5]],
                               attributes=ExpertsSpec(layer=layer).attributes(), domain=DOMAIN,
                               name=f"layers.{layer}.experts")
        experts_node.outputs[0].dtype = FLOAT
        experts_node.outputs[0].shape = ir.Shape(["T", hidden])
        for node in (logits, top, weights):
            for out in node.outputs:
                out.dtype = FLOAT if out is not top.outputs[1] else ir.DataType.INT64
        logits.outputs[0].shape = ir.Shape(["T", experts])
        for out in top.outputs:
            out.shape = ir.Shape(["T", k])
        nodes += [logits, top, weights, *([routes] if own_routes else []), experts_node]
        current = experts_node.outputs[0]
    current.name = "y"
    return model([x], nodes, [current], inits, {DOMAIN: 1})
