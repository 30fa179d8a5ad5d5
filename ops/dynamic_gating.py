"""The `moec.DynamicGating` op: online dynamic pruning of a layer's routing.

Inputs: top_k_weights [T, k], the family's own routing weights (whatever its router computed:
softmax, sigmoid with bias correction, sparsemixer, ...); top_k_index [T, k]; importance [T], one
score per token; enabled, a bool scalar (false turns pruning off at run time, no recompile
needed); keep_experts [E] (bool), the layer's experts never dropped (super experts).
Attributes: beta, top_p and protect_fraction.
Outputs: weights [T, k] and keep [T, k] (bool); a dropped (token, expert) pair has keep false and
weight 0.

Rules, both applied (a token keeps an expert only if each rule keeps it):
- beta (MC-MoE, arXiv 2410.06270): drop each expert whose weight is below beta times the token's
  top-1 weight; beta = 0 is off.
- top-p ("Harder Tasks Need More Experts: Dynamic Routing in MoE Models"): keep the fewest top
  experts whose cumulative weight, normalized over the token's top-k, reaches top_p (an expert is
  kept while the weight of the experts ranked above it is below top_p of the total; ties ranked by
  position); top_p = 1 is off.
The top-1 (every expert at the token's largest weight) is always kept. Then the floor(protect_fraction
* T) tokens of highest importance keep all their experts, so a single decode token is pruned by the
rules alone (T counts every token of the call, batch x sequence, left padding included), and an
expert in keep_experts is kept by every token that selected it, whatever its rank and weight.
The kept weights are scaled back to the token's top-k weight sum (RENORMALIZE), whatever the
family's router computed, so no family knowledge is needed: measured on the sample at the same
pruned fractions (0.10 to 0.35), that lost 0.3 to 0.65 less perplexity than leaving them as the
router gave them (bench/pruning.py; docs/measurements.md's pruning section). beta = 0 and top_p = 1 is the
plain routing, bit for bit.

The op is an ONNX function authored with onnxscript: any onnxruntime runs it without a custom
library, and netron shows it as one node that opens into its body. `prune` is its NumPy reference.
"""

import functools

import numpy as np
from onnxscript import BOOL, FLOAT, INT64, script  # module level: onnxscript resolves annotations here
from onnxscript import opset23 as op  # the opset moec.trace exports with: a function must import the model's
from onnxscript.values import Opset

from moec.ops.moe import DOMAIN

OP_TYPE = "DynamicGating"
RENORMALIZE = True  # see the module docstring


# --------------------------------------------------------------------------- NumPy reference

def importance(hidden: np.ndarray) -> np.ndarray:
    """Per-token importance the artifact uses: the L1 norm of the token's hidden state at the
    experts' input (a proxy for the paper's attention-received x L1 norm; fused attention kernels
    do not expose attention probabilities)."""
    return np.abs(hidden).sum(-1).astype(np.float32)


def protected_tokens(token_importance: np.ndarray, protect_fraction: float) -> np.ndarray:
    """Mask [T] of the floor(protect_fraction * T) most important tokens, ties to the lower index."""
    count = int(np.floor(np.float32(protect_fraction) * np.float32(len(token_importance))))
    mask = np.zeros(len(token_importance), bool)
    mask[np.argsort(-token_importance, kind="stable")[:count]] = True
    return mask


def prune(weights: np.ndarray, spec, token_importance: np.ndarray | None = None, enabled: bool = True,
          renormalize: bool = RENORMALIZE, top_k_index: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The pruning rules on a routing's weights [T, k] (spec: its beta, top_p, protect_fraction and
    keep_experts, which need `top_k_index`): (kept weights, keep mask). `renormalize` scales the kept
    weights back to the top-k sum, as the op does (False: the alternative docs/measurements.md's
    measurement compares)."""
    weights = np.asarray(weights, np.float32)
    top1 = weights.max(-1, keepdims=True)
    keep = np.ones(weights.shape, bool)
    if enabled:
        keep = weights >= np.float32(spec.beta) * top1  # the top-1 itself always, as beta <= 1
        if spec.top_p < 1:
            order = np.argsort(-weights, axis=-1, kind="stable")  # TopK's order: ties by position
            ranked = np.take_along_axis(weights, order, -1)
            inclusive = np.cumsum(ranked, -1, dtype=np.float32)
            within = (inclusive - ranked) < np.float32(spec.top_p) * inclusive[:, -1:]
            by_mass = np.zeros_like(keep)
            np.put_along_axis(by_mass, order, within, -1)
            keep &= by_mass | (weights >= top1)
    if token_importance is not None and spec.protect_fraction > 0:
        keep |= protected_tokens(token_importance, spec.protect_fraction)[:, None]
    if spec.keep_experts:
        if top_k_index is None:
            raise ValueError("keep_experts needs top_k_index")
        keep |= np.isin(top_k_index, spec.keep_experts)
    kept = np.where(keep, weights, np.float32(0))
    if renormalize:
        kept_total = kept.sum(-1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            kept = kept * np.where(kept_total > 0, weights.sum(-1, keepdims=True) / kept_total, np.float32(1))
    return kept.astype(np.float32), keep


# --------------------------------------------------------------------------- ONNX function

def function_proto():
    """The FunctionProto of DynamicGating, for a model's functions."""
    return _function().to_function_proto()


@functools.cache
def _function():
    moec = Opset(DOMAIN, 1)

    @script(moec, default_opset=op)
    def DynamicGating(top_k_weights: FLOAT, top_k_index: INT64, importance: FLOAT, enabled: BOOL, keep_experts: BOOL,
                      beta: float, top_p: float, protect_fraction: float):
        # beta: drop what is below beta x top-1
        top1, _ = op.TopK(top_k_weights, op.Constant(value_ints=[1]), axis=-1)
        beta_now = op.Where(enabled, op.Constant(value_float=beta), op.Constant(value_float=0.0))
        keep_by_weight = op.GreaterOrEqual(top_k_weights, op.Mul(top1, beta_now))  # top-1 itself: beta <= 1
        # top-p: keep while the weight ranked above is below top_p of the total (2: off)
        ranked, order = op.TopK(top_k_weights, op.Shape(top_k_weights, start=-1), axis=-1)
        inclusive = op.CumSum(ranked, op.Constant(value_int=-1))
        total = op.Slice(inclusive, op.Constant(value_ints=[-1]), op.Constant(value_ints=[2**62]),
                         op.Constant(value_ints=[-1]))
        p_now = op.Where(enabled, op.Constant(value_float=top_p), op.Constant(value_float=2.0))
        p_now = op.Where(op.Less(p_now, op.Constant(value_float=1.0)), p_now, op.Constant(value_float=2.0))
        within = op.Less(op.Sub(inclusive, ranked), op.Mul(p_now, total))
        by_mass = op.ScatterElements(within, order, within, axis=-1)
        keep_by_mass = op.Or(by_mass, op.GreaterOrEqual(top_k_weights, top1))
        keep_by_rules = op.And(keep_by_weight, keep_by_mass)
        # the most important tokens keep all their experts
        tokens = op.Shape(importance)
        count = op.Cast(op.Floor(op.Mul(op.Cast(tokens, to=1), op.Constant(value_float=protect_fraction))), to=7)
        _, most_important = op.TopK(importance, count, axis=-1)
        protected = op.ScatterElements(op.Expand(op.Cast(op.Constant(value_int=0), to=9), tokens), most_important,
                                       op.Expand(op.Cast(op.Constant(value_int=1), to=9), op.Shape(most_important)),
                                       axis=0)
        keep = op.Or(keep_by_rules, op.Unsqueeze(protected, op.Constant(value_ints=[-1])))
        # and a super expert is kept by every token that selected it
        keep = op.Or(keep, op.Gather(keep_experts, top_k_index))
        kept = op.Where(keep, top_k_weights, op.Constant(value_float=0.0))
        # scaled back to the token's top-k weight sum (all-zero weights stay zero)
        weights_total = op.ReduceSum(top_k_weights, op.Constant(value_ints=[-1]), keepdims=1)
        kept_total = op.ReduceSum(kept, op.Constant(value_ints=[-1]), keepdims=1)
        factor = op.Where(op.Greater(kept_total, op.Constant(value_float=0.0)), op.Div(weights_total, kept_total),
                          op.Constant(value_float=1.0))
        return op.Mul(kept, factor), keep

    return DynamicGating
