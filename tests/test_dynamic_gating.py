"""moec.DynamicGating: the onnxscript functions against the NumPy reference, for every family's
routing, with and without pruning, and the run-time switch through the MoE lowering."""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from moec.ops.dynamic_gating import OP_TYPE, ROUTING_ATTRIBUTES, function_protos, gate
from moec.ops.moe import MoESpec, moe_reference
from test_moe_op import random_weights, run_lowered

E = 8
ROUTINGS = {
    "softmax": MoESpec(layer=0, top_k=2),
    "softmax-raw-k3": MoESpec(layer=0, top_k=3, normalize=False),
    "softmax-k1": MoESpec(layer=0, top_k=1),
    "sigmoid-groups": MoESpec(layer=0, top_k=3, scoring="sigmoid", scaling=2.5, n_group=4, topk_group=2),
    "sigmoid-flat-raw": MoESpec(layer=0, top_k=2, scoring="sigmoid", normalize=False),
    "sparsemixer": MoESpec(layer=0, top_k=2, scoring="sparsemixer", normalize=False, jitter_eps=0.5),
}
PRUNINGS = {"plain": (0.0, 0.0), "beta": (0.6, 0.0), "beta-protect": (0.6, 0.3), "beta-one": (1.0, 0.5)}


def gating_session(spec: MoESpec) -> ort.InferenceSession:
    sigmoid = spec.scoring == "sigmoid"
    inputs = ["logits", *(["score_bias"] if sigmoid else []), "importance", "enabled"]
    attributes = {name: value for name, value in spec.attributes().items()
                  if name in (*ROUTING_ATTRIBUTES, "beta", "protect_fraction")}
    node = helper.make_node(OP_TYPE, inputs, ["weights", "indices", "keep"], domain="moec",
                            overload=spec.scoring, **attributes)
    info = helper.make_tensor_value_info
    graph = helper.make_graph(
        [node], "gating",
        [info("logits", onnx.TensorProto.FLOAT, ["T", E]),
         *([info("score_bias", onnx.TensorProto.FLOAT, [E])] if sigmoid else []),
         info("importance", onnx.TensorProto.FLOAT, ["T"]), info("enabled", onnx.TensorProto.BOOL, [])],
        [info("weights", onnx.TensorProto.FLOAT, ["T", spec.top_k]),
         info("indices", onnx.TensorProto.INT64, ["T", spec.top_k]),
         info("keep", onnx.TensorProto.BOOL, ["T", spec.top_k])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("moec", 1)],
                              functions=function_protos(), ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def assert_gating_matches(spec, logits, score_bias, importance, enabled):
    session = gating_session(spec)
    feeds = {"logits": logits, "importance": importance, "enabled": np.array(enabled)}
    if spec.scoring == "sigmoid":
        feeds["score_bias"] = score_bias
    weights, indices, keep = session.run(None, feeds)
    want_weights, want_indices, want_keep = gate(logits, spec, score_bias if spec.scoring == "sigmoid" else None,
                                                 importance, enabled)
    assert weights.shape == indices.shape == keep.shape == (len(logits), spec.top_k)
    np.testing.assert_array_equal(indices, want_indices)
    np.testing.assert_array_equal(keep, want_keep)
    np.testing.assert_allclose(weights, want_weights, rtol=1e-5, atol=1e-6)
    return keep


@pytest.mark.parametrize("enabled", [True, False], ids=["on", "off"])
@pytest.mark.parametrize("tokens", [0, 1, 9])
@pytest.mark.parametrize("pruning", PRUNINGS)
@pytest.mark.parametrize("routing", ROUTINGS)
def test_function_matches_reference(routing, pruning, tokens, enabled):
    beta, protect = PRUNINGS[pruning]
    spec = dataclasses.replace(ROUTINGS[routing], beta=beta, protect_fraction=protect)
    rng = np.random.default_rng(zlib.crc32(f"{routing}/{pruning}/{tokens}".encode()))
    logits = (rng.normal(size=(tokens, E)) * 2).astype(np.float32)
    score_bias = (rng.normal(size=E) * 0.1).astype(np.float32)
    importance = rng.random(tokens).astype(np.float32)
    keep = assert_gating_matches(spec, logits, score_bias, importance, enabled)
    if not enabled or beta == 0:
        assert keep.all()


@pytest.mark.parametrize("pruning", PRUNINGS)
@pytest.mark.parametrize("routing", ROUTINGS)
def test_function_on_ties(routing, pruning):
    """All-equal logits, duplicated values and tied importance resolve as the reference does."""
    beta, protect = PRUNINGS[pruning]
    spec = dataclasses.replace(ROUTINGS[routing], beta=beta, protect_fraction=protect)
    logits = np.array([[0.0] * E, [1.0] * E, [2, 2, 1, 1, 3, 3, 0, 0], [5, 0, 0, 0, 0, 0, 0, 4.9]], np.float32)
    importance = np.array([1.0, 1.0, 2.0, 1.0], np.float32)
    assert_gating_matches(spec, logits, np.zeros(E, np.float32), importance, True)


def test_the_rule_drops_below_beta_times_top1_and_protects_the_important_tokens():
    spec = MoESpec(layer=0, top_k=3, normalize=True, beta=0.5, protect_fraction=0.5)
    weights = np.array([[0.6, 0.29, 0.11], [0.4, 0.35, 0.25], [0.7, 0.2, 0.1], [0.5, 0.3, 0.2]], np.float32)
    from moec.ops.dynamic_gating import prune

    kept, keep = prune(weights, spec, token_importance=np.array([0.0, 3.0, 1.0, 2.0], np.float32))
    # tokens 1 and 3 are the top half by importance: kept whole; tokens 0 and 2 lose what is < 0.5 x top-1
    np.testing.assert_array_equal(keep, [[1, 0, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]])
    np.testing.assert_allclose(kept.sum(-1), weights.sum(-1), rtol=1e-6)  # renormalized, as the family does
    np.testing.assert_allclose(kept[0], [1.0, 0, 0])
    decode, keep_one = prune(weights[:1], spec, token_importance=np.array([9.0], np.float32))
    assert keep_one.tolist() == [[True, False, False]]  # one token: floor(0.5 x 1) = 0 protected


@pytest.mark.parametrize("routing", ["softmax-raw-k3", "sigmoid-groups", "sparsemixer"])
def test_lowering_prunes_and_the_switch_turns_it_off(routing):
    """The lowered graph computes the pruned MoE; with its prune_experts switch overridden to
    false by the session, the plain one."""
    pruned = dataclasses.replace(ROUTINGS[routing], beta=0.7)
    plain = dataclasses.replace(pruned, beta=0.0)
    rng = np.random.default_rng(7)
    weights = random_weights(rng, pruned)
    hidden = rng.normal(size=(16, 16)).astype(np.float32)
    logits = (rng.normal(size=(16, E)) * 0.5).astype(np.float32)
    bias = {"score_bias": weights["score_bias"]} if "score_bias" in weights else {}
    _, _, keep = gate(logits, pruned, bias.get("score_bias"))
    assert 0 < keep.sum() < keep.size  # the rule really drops pairs here
    with_pruning = moe_reference(hidden, logits, **weights, spec=pruned)
    without = moe_reference(hidden, logits, **weights, spec=plain)
    assert np.abs(with_pruning - without).max() > 1e-3
    np.testing.assert_allclose(run_lowered(pruned, weights, hidden, logits), with_pruning, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(run_lowered(pruned, weights, hidden, logits, prune=False), without,
                               rtol=1e-4, atol=1e-4)
