"""LowerMoEPass: each moec::Experts node → its experts' own products (the numerics of every
layout and activation: tests/test_moe_op.py)."""

import re

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from graphs import moe_layers

from moec.ops.moe import PRUNE_SWITCH, ExpertsSpec, expert_weight_name, stacked_reference
from moec.passes.lower_moe import FusedExperts, LowerMoEPass
from moec.passes.matmul_nbits import MatMulNBitsPass
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
            np.testing.assert_allclose(session.run(None, {"x": x})[0], expected, rtol=1e-3, atol=1e-2)


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


def _quantized_layers(widths: dict, hidden=64, inter=64, experts=8, k=3, group=32):
    """Two sparse layers, each expert quantized at widths[e] (None: float), and their stacked
    weights dequantized as the kernels should compute them."""
    from moec.quant import Quantizer, rtn

    model = moe_layers([0, 1], hidden=hidden, inter=inter, experts=experts, k=k)
    for name, value in model.graph.initializers.items():  # weights of a trained model's scale
        if ".experts." in name:
            value.const_value = ir.tensor(value.const_value.numpy() * 0.1, name=name)
    stacked = {name: v.const_value.numpy().copy() for name, v in model.graph.initializers.items()}
    specs = {expert_weight_name(layer, e, p): Quantizer(bits, group, bits) for layer in (0, 1)
             for e, bits in widths.items() if bits for p in ("gate", "up", "down")}
    for layer in (0, 1):
        gate_up, down = stacked[f"layers.{layer}.experts.gate_up_proj"], stacked[f"layers.{layer}.experts.down_proj"]
        for e, bits in widths.items():
            if bits:
                for rows in (slice(inter), slice(inter, None)):
                    gate_up[e, rows] = rtn(gate_up[e, rows], bits, group).dequantize()
                down[e] = rtn(down[e], bits, group).dequantize()
    return model, stacked, specs


def _routed_reference(x, stacked, k=3):
    for layer in (0, 1):
        logits = x @ stacked[f"layers.{layer}.router.weight"]
        index = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
        top = np.take_along_axis(logits, index, -1)
        weights = np.exp(top - top.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        x = stacked_reference(x, index, weights, stacked[f"layers.{layer}.experts.gate_up_proj"],
                              stacked[f"layers.{layer}.experts.down_proj"], spec=ExpertsSpec(layer=layer))
    return x


@pytest.mark.parametrize("tokens", [0, 1, 7])
def test_fused_widths_become_one_qmoe_node_each_beside_the_other_experts(tokens):
    """4-bit experts in one QMoE node a layer, 8-bit and float ones per expert; the sum is exact
    (QMoE's 4-bit kernel at accuracy_level 0), for no token, one and several."""
    widths = {0: 4, 1: 8, 2: 4, 3: None, 4: 4, 5: 8, 6: 4, 7: 4}
    model, stacked, specs = _quantized_layers(widths)
    LowerMoEPass(None, FusedExperts(specs, frozenset((2, 4)), accuracy_level=0))(model)
    MatMulNBitsPass(specs, accuracy_level=0)(model)
    qmoe = [n for n in model.graph if n.op_type == "QMoE"]
    assert [(n.attributes["expert_weight_bits"].value, n.attributes["k"].value) for n in qmoe] == [(4, 3)] * 2
    assert model.graph.initializers["layers.1.experts.4bit.experts"].const_value.numpy().tolist() == [0, 2, 4, 6, 7]
    assert sum(n.op_type == "MatMulNBits" for n in model.graph) == 2 * 2 * 3  # experts 1 and 5
    assert "layers.0.experts.3.gate_proj" in model.graph.initializers  # float, per expert
    x = np.random.default_rng(0).normal(size=(tokens, 64)).astype(np.float32)
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    expected = _routed_reference(x, stacked)  # large values (random weights): compared to their scale
    scale = np.abs(expected).max(initial=1)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], expected, rtol=0, atol=1e-5 * scale)


def test_a_layer_of_few_experts_is_not_fused_and_float_activations_only():
    model, _, specs = _quantized_layers({e: 4 for e in range(8)})
    LowerMoEPass(None, FusedExperts(specs, frozenset((4,)), accuracy_level=0, min_experts=9))(model)
    assert not [n for n in model.graph if n.op_type == "QMoE"]


def test_verification_runs_2_and_8_bit_qmoe_exactly(tmp_path):
    """onnxruntime's 2- and 8-bit QMoE round activations to int8 (off by percents); the verification
    copy repacks 2-bit codes and zero points for the exact 4-bit kernel, and makes 8-bit scales
    overridable, which sends QMoE to dequantize-and-SGEMM: one QMoE per width, float experts per
    expert, and the copy matches to float rounding."""
    from moec.verify import _exact_kernels

    model, stacked, specs = _quantized_layers({0: 2, 1: 8, 2: 4, 3: None, 4: 2, 5: 8, 6: 4, 7: 8})
    LowerMoEPass(None, FusedExperts(specs, frozenset((2, 4, 8)), accuracy_level=4))(model)
    assert sorted(n.attributes["expert_weight_bits"].value for n in model.graph if n.op_type == "QMoE") == \
        [2, 2, 4, 4, 8, 8]
    ir.save(model, tmp_path / "model.onnx", external_data="model.onnx.data", size_threshold_bytes=1024)
    x = np.random.default_rng(1).normal(size=(9, 64)).astype(np.float32)
    expected = _routed_reference(x, stacked)

    def run(path):
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    shipped = np.abs(run(tmp_path / "model.onnx") - expected).max() / np.abs(expected).max()
    assert 1e-3 < shipped < 0.1  # the kernel's own rounding, not a packing error
    with _exact_kernels(tmp_path / "model.onnx") as exact:
        np.testing.assert_allclose(run(exact), expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]  # the copy is gone


def test_a_looped_layer_lowers_once_per_pass_over_one_set_of_weights():
    """A layer the model runs twice per token (Inkling2-Loop's loop layer: one Experts node per pass,
    both reading the layer's weights): each pass is lowered with its nodes and activation count named
    apart, the per-expert weights (QMoE groups, MatMulNBits codes and merged gate/up products) are
    written once and read by both, and the graph computes the layer twice."""
    from moec.passes.merge_sibling_products import MergeSiblingProductsPass

    widths = {0: 4, 1: 8, 2: 4, 3: None, 4: 4, 5: 8, 6: 4, 7: 4}
    model, stacked, specs = _quantized_layers(widths)
    second = next(n for n in model.graph if n.domain == "moec" and n.name == "layers.1.experts")
    second.attributes["layer"] = ir.AttrInt64("layer", 0)
    for index, name in ((3, "gate_up_proj"), (4, "down_proj")):
        second.replace_input_with(index, model.graph.initializers[f"layers.0.experts.{name}"])
    router = next(n for n in model.graph if n.name == "layers.1.router/MatMul")
    router.replace_input_with(1, model.graph.initializers["layers.0.router.weight"])
    for name in ("gate_up_proj", "down_proj"):
        stacked[f"layers.1.experts.{name}"] = stacked[f"layers.0.experts.{name}"]
    stacked["layers.1.router.weight"] = stacked["layers.0.router.weight"]
    specs = {name: spec for name, spec in specs.items() if name.startswith("layers.0.")}
    LowerMoEPass(None, FusedExperts(specs, frozenset((2, 4)), accuracy_level=0))(model)
    MatMulNBitsPass(specs, accuracy_level=0)(model)
    MergeSiblingProductsPass()(model)
    proto = ir.to_proto(model)
    assert [o.name for o in proto.graph.output if o.name.startswith("expert_activations")] == \
        ["expert_activations.0", "expert_activations.pass1.0"]
    names = [i.name for i in proto.graph.initializer]
    assert len(names) == len(set(names)) and not any(re.match(r"layers\.1\.experts\.\d", name) for name in names)
    assert len({n.name for n in proto.graph.node}) == len(proto.graph.node)
    assert [n.op_type for n in proto.graph.node].count("QMoE") == 2
    qmoe_weights = {tuple(i for i in n.input if i in names) for n in proto.graph.node if n.op_type == "QMoE"}
    assert len(qmoe_weights) == 1  # both passes read the one packed group
    x = np.random.default_rng(0).normal(size=(7, 64)).astype(np.float32)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = _routed_reference(x, stacked)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], expected, rtol=0, atol=1e-5 * np.abs(expected).max())
