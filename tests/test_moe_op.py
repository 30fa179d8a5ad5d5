"""The moec::MoE op: NumPy reference vs transformers, and the lowering pass vs the reference."""

from __future__ import annotations

import zlib

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from moec.adapters import adapter_for
from moec.ops.moe import INPUT_NAMES, PRUNE_SWITCH, MoESpec, moe_reference, route
from moec.passes.lower_moe import LowerMoEPass
from moec.trace import swap_moe_blocks
from tiny import ARCHITECTURES

H, I, E = 16, 24, 8

SPECS = {
    "softmax-normalized": MoESpec(layer=0, top_k=2),
    "softmax-raw-k3": MoESpec(layer=0, top_k=3, normalize=False),
    "softmax-k1": MoESpec(layer=0, top_k=1),
    "sigmoid-groups": MoESpec(layer=0, top_k=2, scoring="sigmoid", scaling=2.5, n_group=4, topk_group=2),
    "sigmoid-flat-raw": MoESpec(layer=0, top_k=3, scoring="sigmoid", normalize=False),
    "sparsemixer": MoESpec(layer=0, top_k=2, scoring="sparsemixer", normalize=False, jitter_eps=0.01),
    "clamped-swiglu": MoESpec(layer=0, top_k=2, activation="clamped_swiglu", swiglu_limit=0.5),
    "softmax-pruned": MoESpec(layer=0, top_k=3, beta=0.5, protect_fraction=0.3),
    "sigmoid-groups-pruned": MoESpec(layer=0, top_k=2, scoring="sigmoid", scaling=2.5, n_group=4,
                                     topk_group=2, beta=0.9),
    "sparsemixer-pruned": MoESpec(layer=0, top_k=2, scoring="sparsemixer", normalize=False, jitter_eps=0.5,
                                  beta=0.6, protect_fraction=0.2),
}


def moe_graph(spec: MoESpec, weights: dict[str, np.ndarray]) -> ir.Model:
    """A model holding one moec::MoE node: inputs hidden and router_logits, weights as initializers."""
    hidden = ir.Value(name="hidden", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["T", H]))
    logits = ir.Value(name="router_logits", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["T", E]))
    initializers = [ir.Value(name=n, const_value=ir.tensor(a, name=n)) for n, a in weights.items()]
    by_name = {v.name: v for v in initializers}
    node = ir.node("MoE", [hidden, logits, *(by_name.get(n) for n in INPUT_NAMES[2:])],
                   attributes=spec.attributes(), domain="moec")
    node.outputs[0].name = "output"
    graph = ir.Graph([hidden, logits], node.outputs, nodes=[node], initializers=initializers,
                     opset_imports={"": 21, "moec": 1})
    return ir.Model(graph, ir_version=10)


def random_weights(rng, spec: MoESpec) -> dict[str, np.ndarray]:
    w = {"gate": rng.normal(size=(E, I, H)), "up": rng.normal(size=(E, I, H)),
         "down": rng.normal(size=(E, H, I)) / np.sqrt(I)}
    if spec.activation == "clamped_swiglu":
        w |= {"gate_bias": rng.normal(size=(E, I)), "up_bias": rng.normal(size=(E, I)),
              "down_bias": rng.normal(size=(E, H))}
    if spec.scoring == "sigmoid":
        w["score_bias"] = rng.normal(size=E) * 0.1
    return {k: v.astype(np.float32) for k, v in w.items()}


def run_lowered(spec, weights, hidden, logits, prune=True, experts_per_subgraph=None):
    model = moe_graph(spec, weights)
    assert LowerMoEPass(experts_per_subgraph)(model).modified
    assert [n.op_type for n in model.graph if n.domain == "moec"] == ["DynamicGating"]
    assert [v.name for v in model.graph.inputs][2:] == ([PRUNE_SWITCH] if spec.beta > 0 else [])
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    switch = {} if prune else {PRUNE_SWITCH: np.array(False)}
    return session.run(None, {"hidden": hidden, "router_logits": logits, **switch})[0]


@pytest.mark.parametrize("tokens", [0, 1, 7])
@pytest.mark.parametrize("name", SPECS)
def test_lowering_matches_reference(name, tokens):
    spec = SPECS[name]
    rng = np.random.default_rng(zlib.crc32(f"{name}/{tokens}".encode()))
    weights = random_weights(rng, spec)
    hidden = rng.normal(size=(tokens, H)).astype(np.float32)
    logits = (rng.normal(size=(tokens, E)) * 2).astype(np.float32)
    expected = moe_reference(hidden, logits, **weights, spec=spec)
    got = run_lowered(spec, weights, hidden, logits)
    assert got.shape == (tokens, H)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tokens", [0, 1, 7])
@pytest.mark.parametrize("name", ["softmax-normalized", "sigmoid-groups-pruned", "clamped-swiglu"])
def test_lowering_in_expert_subgraphs_matches_reference(name, tokens):
    """Experts computed in If subgraphs of 3 (8 experts: chunks 0-2, 3-5, 6-7), a chunk no token is
    routed to skipped, give what the flat lowering gives."""
    import onnx

    spec = SPECS[name]
    rng = np.random.default_rng(zlib.crc32(f"sub/{name}/{tokens}".encode()))
    weights = random_weights(rng, spec)
    hidden = rng.normal(size=(tokens, H)).astype(np.float32)
    logits = (rng.normal(size=(tokens, E)) * 2).astype(np.float32)
    logits[:, 6:] -= 30  # nothing routed to the last chunk
    model = moe_graph(spec, weights)
    LowerMoEPass(3)(model)
    model.graph.name = "moe"
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    assert [n.op_type for n in model.graph].count("If") == 3
    got = run_lowered(spec, weights, hidden, logits, experts_per_subgraph=3)
    np.testing.assert_allclose(got, moe_reference(hidden, logits, **weights, spec=spec), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", SPECS)
def test_lowering_on_ties(name):
    """All-equal logits and duplicated values: ties resolve to the lower expert index everywhere."""
    spec = SPECS[name]
    rng = np.random.default_rng(1)
    weights = random_weights(rng, spec)
    weights.pop("score_bias", None)
    hidden = rng.normal(size=(3, H)).astype(np.float32)
    logits = np.array([[0.0] * E, [1.0] * E, [2, 2, 1, 1, 3, 3, 0, 0]], np.float32)
    expected = moe_reference(hidden, logits, **weights, spec=spec)
    np.testing.assert_allclose(run_lowered(spec, weights, hidden, logits), expected, rtol=1e-4, atol=1e-4)
    _, picked = route(logits, spec)
    assert list(picked[0]) == list(range(spec.top_k))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_reference_matches_transformers(arch, tmp_path):
    """Swapping each sparse block for the op (run by its NumPy reference) keeps the logits."""
    import tiny

    model = tiny.save_tiny(arch, tmp_path)
    ids = torch.randint(0, tiny.VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(ids).logits
        blocks, _ = swap_moe_blocks(model, adapter_for(model.config))
        got = model(ids).logits
    assert blocks and all(type(getattr(model.get_submodule(b.path.rpartition(".")[0]),
                                       b.path.rpartition(".")[2])).__name__ == "TracedMoE" for b in blocks)
    assert (got - expected).abs().max().item() < 1e-5


def test_lowering_upcasts_experts_stored_in_bf16():
    """Expert weights held in the checkpoint's bf16 are lowered to fp32 initializers, one expert at
    a time, computing exactly what the fp32 upcast weights compute."""
    import ml_dtypes

    spec = SPECS["clamped-swiglu"]
    rng = np.random.default_rng(5)
    weights = random_weights(rng, spec)
    stored = {k: v.astype(ml_dtypes.bfloat16) if k != "score_bias" else v for k, v in weights.items()}
    upcast = {k: v.astype(np.float32) for k, v in stored.items()}
    model = moe_graph(spec, stored)
    assert LowerMoEPass()(model).modified
    experts = [v for v in model.graph.initializers.values() if ".experts." in v.name]
    assert experts and all(v.const_value.dtype == ir.DataType.FLOAT for v in experts)
    hidden = rng.normal(size=(6, H)).astype(np.float32)
    logits = rng.normal(size=(6, E)).astype(np.float32)
    ir.passes.common.RemoveUnusedNodesPass()(model)
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"hidden": hidden, "router_logits": logits})[0]
    np.testing.assert_allclose(got, moe_reference(hidden, logits, **upcast, spec=spec), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_reference_moe_with_experts_in_bf16_matches_transformers(arch, tmp_path):
    """ReferenceMoE (what verification and calibration run) computes a block whose routed experts
    stay in bf16 as transformers computes it with those weights in fp32."""
    import tiny
    from moec.reference import swap_block

    model = tiny.save_tiny(arch, tmp_path)
    adapter = adapter_for(model.config)
    ids = torch.randint(0, tiny.VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for experts in adapter.routed_experts(model):
            experts.to(torch.bfloat16).float()  # round the experts to bf16, computing in fp32
        expected = model(ids).logits
        for experts in adapter.routed_experts(model):
            experts.to(torch.bfloat16)
        blocks = adapter.blocks(model)
        assert blocks and all(b.gate.dtype == torch.bfloat16 for b in blocks)
        for block in blocks:
            swap_block(model, block, adapter)
        got = model(ids).logits
    assert (got - expected).abs().max().item() < 1e-5
