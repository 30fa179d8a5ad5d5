"""The `moec.DynamicGating` op: a sparse layer's routing with MC-MoE's online dynamic pruning.

Inputs: router_logits [T, E]; score_bias [E] (sigmoid scoring only); importance [T], one score
per token; enabled, a bool scalar (false turns pruning off at run time, no recompile needed).
Attributes: top_k, normalize, scaling, n_group, topk_group, jitter_eps (the routing, as in
`moec.ops.moe.MoESpec`), beta and protect_fraction (the pruning). The scoring is the function's
overload: "softmax", "sigmoid" or "sparsemixer".
Outputs: weights [T, k], indices [T, k] and keep [T, k] (bool): the routing the expert
subgraphs consume; a dropped (token, expert) pair has keep false and weight 0.

Rule (arXiv 2410.06270): after top-k, a token drops each expert whose weight is below beta times
the token's top-1 weight; the kept weights are renormalized when the architecture normalizes.
The floor(protect_fraction * T) tokens of highest importance keep all their experts, so a single
decode token is pruned by the beta rule alone. T counts every token of the call (batch x
sequence, left padding included), so which tokens are protected depends on the batch. beta = 0
is the plain routing, bit for bit.

Each overload is an ONNX function authored with onnxscript: any onnxruntime runs it without a
custom library, and netron shows it as one node that opens into its body. `gate` is the NumPy
reference of the same semantics.
"""

import functools

import numpy as np
from onnxscript import BOOL, FLOAT, script  # module level: onnxscript resolves annotations here
from onnxscript import opset21 as op
from onnxscript.values import Opset

from moec.ops.moe import DOMAIN, MoESpec, route

OP_TYPE = "DynamicGating"
SHARED_OP_TYPE = "WeighAndPrune"  # the overloads' common tail: normalize, scale, prune
ROUTING_ATTRIBUTES = ("top_k", "normalize", "scaling", "n_group", "topk_group", "jitter_eps")


# --------------------------------------------------------------------------- NumPy reference

def importance(hidden: np.ndarray) -> np.ndarray:
    """Per-token importance the artifact uses: the L1 norm of the token's hidden state at the
    MoE input (a proxy for the paper's attention-received x L1 norm; fused attention kernels
    do not expose attention probabilities)."""
    return np.abs(hidden).sum(-1).astype(np.float32)


def protected_tokens(token_importance: np.ndarray, protect_fraction: float) -> np.ndarray:
    """Mask [T] of the floor(protect_fraction * T) most important tokens, ties to the lower index."""
    count = int(np.floor(np.float32(protect_fraction) * np.float32(len(token_importance))))
    mask = np.zeros(len(token_importance), bool)
    mask[np.argsort(-token_importance, kind="stable")[:count]] = True
    return mask


def prune(weights: np.ndarray, spec: MoESpec, token_importance: np.ndarray | None = None,
          enabled: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The pruning rule on a routing's weights [T, k]: (renormalized kept weights, keep mask)."""
    beta = np.float32(spec.beta if enabled else 0.0)
    top1 = weights.max(-1, keepdims=True)
    keep = weights >= beta * top1  # the top-1 itself always, as beta <= 1
    if token_importance is not None and spec.protect_fraction > 0:
        keep |= protected_tokens(token_importance, spec.protect_fraction)[:, None]
    kept = np.where(keep, weights, np.float32(0))
    if spec.normalize:
        kept_total = kept.sum(-1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            kept = kept * np.where(kept_total > 0, weights.sum(-1, keepdims=True) / kept_total, np.float32(1))
    return kept.astype(np.float32), keep


def gate(logits: np.ndarray, spec: MoESpec, score_bias: np.ndarray | None = None,
         token_importance: np.ndarray | None = None, enabled: bool = True):
    """What a DynamicGating node computes: (weights [T, k], indices [T, k], keep [T, k])."""
    weights, indices = route(logits, spec, score_bias)
    weights, keep = prune(weights, spec, token_importance, enabled)
    return weights, indices, keep


# --------------------------------------------------------------------------- ONNX functions

def function_protos() -> list:
    """FunctionProtos for a model: DynamicGating, one overload per scoring, and WeighAndPrune."""
    protos = []
    for overload, function in _functions().items():
        proto = function.to_function_proto()
        if overload != SHARED_OP_TYPE:
            proto.name, proto.overload = OP_TYPE, overload
        protos.append(proto)
    return protos


@functools.cache
def _functions() -> dict[str, object]:
    """The onnxscript functions: WeighAndPrune, and DynamicGating per scoring (its overload)."""
    moec = Opset(DOMAIN, 1)

    @script(moec, default_opset=op)
    def WeighAndPrune(picked: FLOAT, importance: FLOAT, enabled: BOOL, normalize: int, epsilon: float,
                      scaling: float, beta: float, protect_fraction: float):
        # the family's weights: the picked scores, normalized (sum + epsilon) if it normalizes, scaled
        normalizing = op.Cast(op.Constant(value_int=normalize), to=9)
        sums = op.Add(op.ReduceSum(picked, op.Constant(value_ints=[-1]), keepdims=1), op.Constant(value_float=epsilon))
        weights = op.Mul(op.Div(picked, op.Where(normalizing, sums, op.Constant(value_float=1.0))),
                         op.Constant(value_float=scaling))
        # the pruning rule: drop what is below beta x top-1, unless the token is protected
        top1, _ = op.TopK(weights, op.Constant(value_ints=[1]), axis=-1)
        beta_now = op.Where(enabled, op.Constant(value_float=beta), op.Constant(value_float=0.0))
        keep_by_weight = op.GreaterOrEqual(weights, op.Mul(top1, beta_now))  # top-1 itself: beta <= 1
        tokens = op.Shape(importance)
        count = op.Cast(op.Floor(op.Mul(op.Cast(tokens, to=1), op.Constant(value_float=protect_fraction))), to=7)
        _, most_important = op.TopK(importance, count, axis=-1)
        protected = op.ScatterElements(op.Expand(op.Cast(op.Constant(value_int=0), to=9), tokens), most_important,
                                       op.Expand(op.Cast(op.Constant(value_int=1), to=9), op.Shape(most_important)), axis=0)
        keep = op.Or(keep_by_weight, op.Unsqueeze(protected, op.Constant(value_ints=[-1])))
        kept = op.Where(keep, weights, op.Constant(value_float=0.0))
        total = op.ReduceSum(weights, op.Constant(value_ints=[-1]), keepdims=1)
        kept_total = op.ReduceSum(kept, op.Constant(value_ints=[-1]), keepdims=1)
        renormalize = op.And(normalizing, op.Greater(kept_total, op.Constant(value_float=0.0)))  # 0/0: all zero
        factor = op.Where(renormalize, op.Div(total, kept_total), op.Constant(value_float=1.0))
        return op.Mul(kept, factor), keep

    @script(moec, default_opset=op)
    def DynamicGatingSoftmax(router_logits: FLOAT, importance: FLOAT, enabled: BOOL,
                             top_k: int, normalize: int, scaling: float, n_group: int, topk_group: int,
                             jitter_eps: float, beta: float, protect_fraction: float):
        scores = op.Softmax(router_logits, axis=-1)
        _, indices = op.TopK(scores, op.Reshape(op.Constant(value_int=top_k), op.Constant(value_ints=[1])), axis=-1)
        pruned, keep = WeighAndPrune(op.GatherElements(scores, indices, axis=1), importance, enabled,
                                     normalize=normalize, epsilon=0.0, scaling=scaling, beta=beta,
                                     protect_fraction=protect_fraction)
        return pruned, indices, keep

    @script(moec, default_opset=op)
    def DynamicGatingSigmoid(router_logits: FLOAT, score_bias: FLOAT, importance: FLOAT,
                             enabled: BOOL, top_k: int, normalize: int, scaling: float, n_group: int,
                             topk_group: int, jitter_eps: float, beta: float, protect_fraction: float):
        scores = op.Sigmoid(router_logits)
        choice = op.Add(scores, score_bias)
        # group-limited selection: keep the experts of the topk_group groups whose two best
        # scores sum highest (one group: every expert stays eligible)
        groups = op.Reshape(op.Constant(value_int=n_group), op.Constant(value_ints=[1]))
        per_group = op.Div(op.Shape(choice, start=1), groups)
        grouped = op.Reshape(choice, op.Concat(op.Shape(choice, end=1), groups, per_group, axis=0))
        best_two, _ = op.TopK(grouped, op.Constant(value_ints=[2]), axis=-1)
        group_scores = op.ReduceSum(best_two, op.Constant(value_ints=[-1]), keepdims=0)
        _, best_groups = op.TopK(group_scores, op.Reshape(op.Constant(value_int=topk_group), op.Constant(value_ints=[1])), axis=-1)
        group_mask = op.ScatterElements(op.Mul(group_scores, op.Constant(value_float=0.0)), best_groups,
                                        op.Expand(op.Constant(value_float=1.0), op.Shape(best_groups)), axis=1)
        expert_mask = op.Reshape(op.Expand(op.Unsqueeze(group_mask, op.Constant(value_ints=[-1])),
                                           op.Concat(op.Constant(value_ints=[1, 1]), per_group, axis=0)),
                                 op.Shape(choice))
        choice = op.Where(op.Cast(expert_mask, to=9), choice, op.Constant(value_float=float("-inf")))
        _, indices = op.TopK(choice, op.Reshape(op.Constant(value_int=top_k), op.Constant(value_ints=[1])), axis=-1)
        pruned, keep = WeighAndPrune(op.GatherElements(scores, indices, axis=1), importance, enabled,
                                     normalize=normalize, epsilon=1e-20, scaling=scaling, beta=beta,
                                     protect_fraction=protect_fraction)
        return pruned, indices, keep

    @script(moec, default_opset=op)
    def DynamicGatingSparsemixer(router_logits: FLOAT, importance: FLOAT, enabled: BOOL,
                                 top_k: int, normalize: int, scaling: float, n_group: int, topk_group: int,
                                 jitter_eps: float, beta: float, protect_fraction: float):
        # PhiMoE eval mode: two picks, each a softmax over the logits near the current max
        minus_inf = op.Constant(value_float=float("-inf"))
        threshold = op.Mul(op.Constant(value_float=jitter_eps), op.Constant(value_float=2.0))
        magnitude = op.Abs(router_logits)
        one = op.Constant(value_ints=[1])
        best, first = op.TopK(router_logits, one, axis=-1)  # not ReduceMax/ArgMax: wrong shapes when T = 0
        far = op.Greater(op.Div(op.Sub(best, router_logits), op.Max(magnitude, best)), threshold)
        first_weight = op.GatherElements(op.Softmax(op.Where(far, minus_inf, router_logits), axis=-1), first, axis=1)
        masked = op.ScatterElements(router_logits, first, op.Expand(minus_inf, op.Shape(first)), axis=1)
        best, second = op.TopK(masked, one, axis=-1)
        far = op.Greater(op.Div(op.Sub(best, router_logits), op.Max(magnitude, best)), threshold)
        second_weight = op.GatherElements(op.Softmax(op.Where(far, minus_inf, masked), axis=-1), second, axis=1)
        indices = op.Concat(first, second, axis=1)
        pruned, keep = WeighAndPrune(op.Concat(first_weight, second_weight, axis=1), importance, enabled,
                                     normalize=normalize, epsilon=0.0, scaling=scaling, beta=beta,
                                     protect_fraction=protect_fraction)
        return pruned, indices, keep

    return {SHARED_OP_TYPE: WeighAndPrune, "softmax": DynamicGatingSoftmax, "sigmoid": DynamicGatingSigmoid,
            "sparsemixer": DynamicGatingSparsemixer}
