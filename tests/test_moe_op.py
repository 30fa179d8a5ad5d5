"""The moec::Experts op: NumPy reference and torch op vs transformers' own experts, and the
lowering pass vs the reference."""

from __future__ import annotations

import zlib

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from moec.experts import REFERENCE_IMPLEMENTATION, TRACE_IMPLEMENTATION, experts_layers, set_implementation
from moec.ops.moe import INPUT_NAMES, PRUNE_SWITCH, ExpertsSpec, stacked_reference
from moec.passes.lower_moe import LowerMoEPass
from tiny import ARCHITECTURES

H, I, E, K = 16, 24, 8, 3

SPECS = {
    "silu": ExpertsSpec(layer=0),
    "silu-transposed": ExpertsSpec(layer=0, transposed=True),
    "gelu": ExpertsSpec(layer=0, activation="gelu"),
    "gelu-tanh": ExpertsSpec(layer=0, activation="gelu_tanh"),
    "relu2-no-gate": ExpertsSpec(layer=0, activation="relu2", gate="none"),
    "clamped-swiglu-interleaved": ExpertsSpec(layer=0, activation="clamped_swiglu", gate="interleaved",
                                              transposed=True, swiglu_limit=0.5),
    "clamped-silu": ExpertsSpec(layer=0, activation="clamped_silu", swiglu_limit=0.5),
    "silu-clipped": ExpertsSpec(layer=0, activation="silu_clipped", swiglu_limit=0.5),
    "softcapped-swiglu": ExpertsSpec(layer=0, activation="softcapped_swiglu", gate_softcap=0.7, up_softcap=1.3),
    "silu-pruned": ExpertsSpec(layer=0, beta=0.5, protect_fraction=0.3),
    "clamped-swiglu-pruned": ExpertsSpec(layer=0, activation="clamped_swiglu", gate="interleaved", transposed=True,
                                         beta=0.6, protect_fraction=0.2),
}


def experts_graph(spec: ExpertsSpec, weights: dict[str, np.ndarray]) -> ir.Model:
    """A model holding one moec::Experts node: inputs hidden, top_k_index and top_k_weights,
    weights as initializers."""
    hidden = ir.Value(name="hidden", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["T", H]))
    index = ir.Value(name="top_k_index", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["T", K]))
    routing = ir.Value(name="top_k_weights", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["T", K]))
    initializers = [ir.Value(name=n, const_value=ir.tensor(a, name=n)) for n, a in weights.items()]
    by_name = {v.name: v for v in initializers}
    node = ir.node("Experts", [hidden, index, routing, *(by_name.get(n) for n in INPUT_NAMES[3:])],
                   attributes=spec.attributes(), domain="moec")
    node.outputs[0].name = "output"
    graph = ir.Graph([hidden, index, routing], node.outputs, nodes=[node], initializers=initializers,
                     opset_imports={"": 23, "moec": 1})
    return ir.Model(graph, ir_version=10)


def random_weights(rng, spec: ExpertsSpec) -> dict[str, np.ndarray]:
    first = I if spec.gate == "none" else 2 * I
    w = {"gate_up": rng.normal(size=(E, first, H)), "down": rng.normal(size=(E, H, I)) / np.sqrt(I)}
    if spec.transposed:
        w = {k: v.transpose(0, 2, 1) for k, v in w.items()}
    if spec.activation == "clamped_swiglu":
        w |= {"gate_up_bias": rng.normal(size=(E, first)), "down_bias": rng.normal(size=(E, H))}
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in w.items()}


def random_routing(rng, tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Each token's K distinct experts and positive weights, sorted by weight."""
    index = np.array([rng.choice(E, size=K, replace=False) for _ in range(tokens)], np.int64).reshape(tokens, K)
    weights = -np.sort(-rng.uniform(0.05, 1.0, size=(tokens, K)), axis=1).astype(np.float32)
    return index, weights


def run_lowered(spec, weights, hidden, index, routing, prune=True, experts_per_subgraph=None):
    model = experts_graph(spec, weights)
    assert LowerMoEPass(experts_per_subgraph)(model).modified
    gating = ["DynamicGating"] if spec.prunes else []
    assert [n.op_type for n in model.graph if n.domain == "moec"] == gating
    assert [v.name for v in model.graph.inputs][3:] == ([PRUNE_SWITCH] if spec.prunes else [])
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    switch = {} if prune else {PRUNE_SWITCH: np.array(False)}
    return session.run(None, {"hidden": hidden, "top_k_index": index, "top_k_weights": routing, **switch})[0]


@pytest.mark.parametrize("tokens", [0, 1, 7])
@pytest.mark.parametrize("name", SPECS)
def test_lowering_matches_reference(name, tokens):
    spec = SPECS[name]
    rng = np.random.default_rng(zlib.crc32(f"{name}/{tokens}".encode()))
    weights = random_weights(rng, spec)
    hidden = rng.normal(size=(tokens, H)).astype(np.float32)
    index, routing = random_routing(rng, tokens)
    expected = stacked_reference(hidden, index, routing, **weights, spec=spec)
    got = run_lowered(spec, weights, hidden, index, routing)
    assert got.shape == (tokens, H)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tokens", [0, 1, 7])
@pytest.mark.parametrize("name", ["silu", "silu-pruned", "clamped-swiglu-interleaved"])
def test_lowering_in_expert_subgraphs_matches_reference(name, tokens):
    """Experts computed in If subgraphs of 3 (8 experts: chunks 0-2, 3-5, 6-7), a chunk no token is
    routed to skipped, give what the flat lowering gives."""
    import onnx

    spec = SPECS[name]
    rng = np.random.default_rng(zlib.crc32(f"sub/{name}/{tokens}".encode()))
    weights = random_weights(rng, spec)
    hidden = rng.normal(size=(tokens, H)).astype(np.float32)
    _, routing = random_routing(rng, tokens)
    # nothing routed to the last chunk
    index = np.array([rng.choice(6, size=K, replace=False) for _ in range(tokens)], np.int64).reshape(tokens, K)
    model = experts_graph(spec, weights)
    LowerMoEPass(3)(model)
    model.graph.name = "experts"
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    assert [n.op_type for n in model.graph].count("If") == 3
    got = run_lowered(spec, weights, hidden, index, routing, experts_per_subgraph=3)
    np.testing.assert_allclose(got, stacked_reference(hidden, index, routing, **weights, spec=spec),
                               rtol=1e-4, atol=1e-4)


def test_a_token_naming_an_expert_twice_gets_both_weights():
    """LongCat-Flash hands its experts a top-k in which a zero-computation expert, at weight 0, is
    renamed as a real expert, which may be one the token already chose: the lowering adds the two
    weights up (a plain scatter would keep one of them) and matches the reference."""
    spec = SPECS["silu"]
    rng = np.random.default_rng(7)
    weights = random_weights(rng, spec)
    hidden = rng.normal(size=(6, H)).astype(np.float32)
    index, routing = random_routing(rng, 6)
    index[:, 1], routing[:, 1] = index[:, 0], 0.0  # every token names its first expert again, at weight 0
    index[0, 1], routing[0, 1] = index[0, 0], 0.3  # and one names it twice with weight
    expected = stacked_reference(hidden, index, routing, **weights, spec=spec)
    np.testing.assert_allclose(run_lowered(spec, weights, hidden, index, routing), expected, rtol=1e-4, atol=1e-4)


def test_pruning_switch_off_computes_plain_top_k():
    spec = SPECS["silu-pruned"]
    rng = np.random.default_rng(11)
    weights = random_weights(rng, spec)
    hidden = rng.normal(size=(9, H)).astype(np.float32)
    index, routing = random_routing(rng, 9)
    plain = stacked_reference(hidden, index, routing, **weights, spec=ExpertsSpec(layer=0))
    pruned = stacked_reference(hidden, index, routing, **weights, spec=spec)
    assert np.abs(plain - pruned).max() > 1e-3  # the pruning drops something here
    np.testing.assert_allclose(run_lowered(spec, weights, hidden, index, routing, prune=False), plain,
                               rtol=1e-4, atol=1e-4)


def test_a_dropped_expert_a_router_still_names_at_weight_0_is_not_computed():
    """Zaya writes a token's "no expert" as expert 0 with weight 0: with expert 0 dropped, the
    lowering (which has no weights for it) computes the rest, as the reference does."""
    import dataclasses

    spec = dataclasses.replace(SPECS["silu"], dropped=(0,))
    rng = np.random.default_rng(12)
    weights = random_weights(rng, spec)
    hidden = rng.normal(size=(9, H)).astype(np.float32)
    _, routing = random_routing(rng, 9)
    index = np.array([rng.choice(np.arange(1, E), size=K, replace=False) for _ in range(9)], np.int64)
    index[::2, -1], routing[::2, -1] = 0, 0.0  # every other token names expert 0, at weight 0
    np.testing.assert_allclose(run_lowered(spec, weights, hidden, index, routing),
                               stacked_reference(hidden, index, routing, **weights, spec=spec), rtol=1e-4, atol=1e-4)


def test_a_route_to_no_expert_is_computed_by_none():
    """With `sentinel`, a route naming expert E (what moec::Routes writes for a route it drops) is
    computed by no expert, whatever its weight, also where the token's other route names expert
    E - 1 (the one the lowering clamps it to); the layer counts only the routes it computed."""
    import dataclasses

    from moec.ops.moe import ACTIVATIONS_OUTPUT

    spec = dataclasses.replace(SPECS["silu"], sentinel=True)
    rng = np.random.default_rng(13)
    weights = random_weights(rng, spec)
    hidden = rng.normal(size=(8, H)).astype(np.float32)
    index, routing = random_routing(rng, 8)
    index[::2, -1] = E
    index[1, :2] = [E - 1, E]
    model = experts_graph(spec, weights)
    LowerMoEPass()(model)
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    got, computed = session.run(["output", f"{ACTIVATIONS_OUTPUT}.0"],
                                {"hidden": hidden, "top_k_index": index, "top_k_weights": routing})
    expected = stacked_reference(hidden, index, routing, **weights, spec=spec)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert computed == (index < E).sum() < index.size
    skipped = np.where(index < E, index, 0), np.where(index < E, routing, 0)  # as routes to expert 0 at weight 0
    np.testing.assert_allclose(expected, stacked_reference(hidden, *skipped, **weights, spec=SPECS["silu"]),
                               rtol=1e-5, atol=1e-5)


def test_lowering_upcasts_experts_stored_in_bf16():
    """Expert weights held in the checkpoint's bf16 are lowered to fp32 initializers, one expert at
    a time, computing exactly what the fp32 upcast weights compute."""
    import ml_dtypes

    spec = SPECS["clamped-swiglu-interleaved"]
    rng = np.random.default_rng(5)
    weights = random_weights(rng, spec)
    stored = {k: v.astype(ml_dtypes.bfloat16) for k, v in weights.items()}
    upcast = {k: v.astype(np.float32) for k, v in stored.items()}
    model = experts_graph(spec, stored)
    assert LowerMoEPass()(model).modified
    experts = [v for v in model.graph.initializers.values() if ".experts." in v.name]
    assert experts and all(v.const_value.dtype == ir.DataType.FLOAT for v in experts)
    hidden = rng.normal(size=(6, H)).astype(np.float32)
    index, routing = random_routing(rng, 6)
    ir.passes.common.RemoveUnusedNodesPass()(model)
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"hidden": hidden, "top_k_index": index, "top_k_weights": routing})[0]
    np.testing.assert_allclose(got, stacked_reference(hidden, index, routing, **upcast, spec=spec), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_op_and_reference_match_the_family_experts(arch, tmp_path):
    """The torch op's eager body and the reference implementation compute what the family's own
    eager experts compute, routed by the family's own router."""
    import tiny

    model = tiny.save_tiny(arch, tmp_path)
    layers = experts_layers(model)
    assert layers
    ids = torch.randint(0, tiny.VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    logits = {}
    with torch.no_grad():
        for implementation in ("eager", TRACE_IMPLEMENTATION, REFERENCE_IMPLEMENTATION):
            set_implementation(model, implementation)
            logits[implementation] = model(ids).logits
    for implementation in (TRACE_IMPLEMENTATION, REFERENCE_IMPLEMENTATION):
        assert (logits[implementation] - logits["eager"]).abs().max().item() < 1e-5, implementation


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_reference_with_experts_in_bf16_matches_transformers(arch, tmp_path):
    """The reference implementation (what verification and calibration run) computes experts kept
    in bf16 as transformers computes them with those weights in fp32."""
    import tiny

    model = tiny.save_tiny(arch, tmp_path)
    modules = [model.get_submodule(layer.path) for layer in experts_layers(model)]
    ids = torch.randint(0, tiny.VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for experts in modules:
            experts.to(torch.bfloat16).float()  # round the experts to bf16, computing in fp32
        set_implementation(model, "eager")
        expected = model(ids).logits
        for experts in modules:
            experts.to(torch.bfloat16)
        set_implementation(model, REFERENCE_IMPLEMENTATION)
        got = model(ids).logits
    assert (got - expected).abs().max().item() < 1e-5
