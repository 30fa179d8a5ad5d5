"""moec.DynamicGating: the onnxscript function against the NumPy reference, on routing weights
of every shape a family's router gives (normalized or not, scaled, k = 1 to 4), with and without
pruning by each rule (beta, top-p, both), protected tokens and super experts, and the run-time
switch through the experts lowering."""

from __future__ import annotations

import zlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from moec.ops.dynamic_gating import OP_TYPE, function_proto, prune
from moec.ops.moe import ExpertsSpec

PRUNINGS = {"plain": {}, "beta": dict(beta=0.6), "beta-protect": dict(beta=0.6, protect_fraction=0.3),
            "beta-one": dict(beta=1.0, protect_fraction=0.5), "top-p": dict(top_p=0.7),
            "top-p-low": dict(top_p=0.2), "top-p-protect": dict(top_p=0.5, protect_fraction=0.3),
            "top-p-and-beta": dict(beta=0.3, top_p=0.6), "super-experts": dict(beta=0.8, keep_experts=(1, 6)),
            "top-p-super-experts": dict(top_p=0.4, keep_experts=(3,))}
NUM_EXPERTS = 8
# routing weights as families give them: softmax top-k renormalized, raw softmax probabilities,
# scaled sigmoid scores (DeepSeek's routed_scaling_factor), a single expert
WEIGHTS = {
    "normalized-k2": lambda rng, t: _normalized(rng.random((t, 2))),
    "raw-k3": lambda rng, t: _normalized(rng.random((t, 8)))[:, :3],
    "scaled-k4": lambda rng, t: 2.5 * _normalized(rng.random((t, 4))),
    "k1": lambda rng, t: np.ones((t, 1)),
}


def _normalized(x):
    x = -np.sort(-x, axis=1)
    return x / x.sum(1, keepdims=True)


def _indices(rng, weights):
    """Each token's k experts: distinct, of NUM_EXPERTS."""
    return np.array([rng.permutation(NUM_EXPERTS)[:weights.shape[1]] for _ in weights], np.int64).reshape(weights.shape)


def run_gating(weights, indices, importance, enabled, spec):
    """One DynamicGating node in a model of its own, run by onnxruntime: (kept weights, keep)."""
    k = weights.shape[1]
    node = helper.make_node(OP_TYPE, ["weights", "indices", "importance", "enabled", "keep_experts"], ["kept", "keep"],
                            domain="moec", beta=spec.beta, top_p=spec.top_p, protect_fraction=spec.protect_fraction)
    info = helper.make_tensor_value_info
    graph = helper.make_graph(
        [node], "gating",
        [info("weights", onnx.TensorProto.FLOAT, ["T", k]), info("indices", onnx.TensorProto.INT64, ["T", k]),
         info("importance", onnx.TensorProto.FLOAT, ["T"]), info("enabled", onnx.TensorProto.BOOL, []),
         info("keep_experts", onnx.TensorProto.BOOL, [NUM_EXPERTS])],
        [info("kept", onnx.TensorProto.FLOAT, ["T", k]), info("keep", onnx.TensorProto.BOOL, ["T", k])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("moec", 1)],
                              functions=[function_proto()], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"weights": weights, "indices": indices, "importance": importance,
                              "enabled": np.array(enabled),
                              "keep_experts": np.isin(np.arange(NUM_EXPERTS), spec.keep_experts)})


def assert_gating_matches(weights, indices, importance, enabled, pruning):
    spec = ExpertsSpec(layer=0, **pruning)
    kept, keep = run_gating(weights, indices, importance, enabled, spec)
    want_kept, want_keep = prune(weights, spec, importance, enabled, top_k_index=indices)
    assert kept.shape == keep.shape == weights.shape
    np.testing.assert_array_equal(keep, want_keep)
    np.testing.assert_allclose(kept, want_kept, rtol=1e-6, atol=1e-7)
    return keep


@pytest.mark.parametrize("enabled", [True, False], ids=["on", "off"])
@pytest.mark.parametrize("tokens", [0, 1, 9])
@pytest.mark.parametrize("pruning", PRUNINGS)
@pytest.mark.parametrize("routing", WEIGHTS)
def test_function_matches_reference(routing, pruning, tokens, enabled):
    rng = np.random.default_rng(zlib.crc32(f"{routing}/{pruning}/{tokens}".encode()))
    weights = WEIGHTS[routing](rng, tokens).astype(np.float32)
    importance = rng.random(tokens).astype(np.float32)
    keep = assert_gating_matches(weights, _indices(rng, weights), importance, enabled, PRUNINGS[pruning])
    if not enabled or not ExpertsSpec(layer=0, **PRUNINGS[pruning]).prunes:
        assert keep.all()


@pytest.mark.parametrize("pruning", PRUNINGS)
def test_function_on_ties(pruning):
    """Equal weights, weights equal to beta x top-1 or to top_p of the total, and tied importance
    resolve as the reference does."""
    weights = np.array([[0.25] * 4, [0.5, 0.3, 0.3, 0.0], [0.4, 0.24, 0.24, 0.12], [1.0, 0.6, 0.0, 0.0],
                        [0.0] * 4], np.float32)
    importance = np.array([1.0, 1.0, 2.0, 1.0, 1.0], np.float32)
    indices = np.tile(np.arange(4, dtype=np.int64), (5, 1))
    assert_gating_matches(weights, indices, importance, True, PRUNINGS[pruning])


def test_the_rule_drops_below_beta_times_top1_and_protects_the_important_tokens():
    spec = ExpertsSpec(layer=0, beta=0.5, protect_fraction=0.5)
    weights = np.array([[0.6, 0.29, 0.11], [0.4, 0.35, 0.25], [0.7, 0.2, 0.1], [0.5, 0.3, 0.2]], np.float32)
    kept, keep = prune(weights, spec, token_importance=np.array([0.0, 3.0, 1.0, 2.0], np.float32))
    # tokens 1 and 3 are the top half by importance: kept whole; tokens 0 and 2 lose what is < 0.5 x top-1
    np.testing.assert_array_equal(keep, [[1, 0, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]])
    # the kept weights are scaled back to the token's top-k sum
    np.testing.assert_allclose(kept.sum(-1), weights.sum(-1), rtol=1e-6)
    np.testing.assert_allclose(kept[0], [1.0, 0, 0])
    decode, keep_one = prune(weights[:1], spec, token_importance=np.array([9.0], np.float32))
    assert keep_one.tolist() == [[True, False, False]]  # one token: floor(0.5 x 1) = 0 protected
    as_routed, _ = prune(weights, spec, token_importance=np.array([0.0, 3.0, 1.0, 2.0], np.float32),
                         renormalize=False)
    np.testing.assert_allclose(as_routed, np.where(keep, weights, 0))


def test_top_p_keeps_the_fewest_top_experts_reaching_p_and_super_experts_whatever_their_rank():
    weights = np.array([[0.1, 0.5, 0.3, 0.1], [0.25, 0.25, 0.25, 0.25], [0.9, 0.05, 0.03, 0.02]], np.float32)
    indices = np.array([[0, 1, 2, 3], [4, 5, 6, 7], [3, 2, 1, 0]])
    _, keep = prune(weights, ExpertsSpec(layer=0, top_p=0.7), top_k_index=indices)
    # 0.5 + 0.3 reaches 0.7; experts tied at the top weight are all kept; the top-1 alone may reach p
    np.testing.assert_array_equal(keep, [[0, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    _, keep = prune(weights, ExpertsSpec(layer=0, top_p=0.7, keep_experts=(0,)), top_k_index=indices)
    np.testing.assert_array_equal(keep, [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 1]])  # expert 0, at any rank
    _, keep = prune(weights, ExpertsSpec(layer=0, top_p=1.0), top_k_index=indices)
    assert keep.all()  # top_p 1 is off
