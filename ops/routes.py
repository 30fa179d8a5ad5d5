"""The `moec::Routes` op: the dynamic pruning of a layer whose experts module routes for itself.

Most experts modules are transformers' experts interface itself, whose moec::Experts node receives
the token's top-k and prunes it. A module may instead take the routing and call the interface
its own way: Ergo's repeats each token's hidden state k times, calls the interface once per route
(top-1 at weight 1), norms each route's output by its expert and only then weighs the routes with
its own routing weights. Its Experts node sees no routing weights to prune by, and the weights the
module sums with must be the pruned ones. moec.experts puts this node on the module's own call
instead.

Inputs: hidden [T, H] (the importance of each token, as moec.DynamicGating reads it),
top_k_index [T, k] (int64) and top_k_weights [T, k], as the module receives them.
Attributes (`RoutesSpec`): the layer, its number of experts E, and its pruning (beta, top_p,
protect_fraction, keep_experts: moec.ops.dynamic_gating).
Outputs: top_k_index and top_k_weights as the module then gets them: a route the pruning drops
names expert E, no expert (the sentinel of transformers' experts interface: nothing computes it;
the Experts node after it has `sentinel` set), at weight 0; the kept weights are DynamicGating's.
A layer that does not prune passes its routing through unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from moec.ops.moe import DOMAIN, FLOATS, NodeAttributes

OP_TYPE = "Routes"


@dataclass(frozen=True)
class RoutesSpec(NodeAttributes):
    """A Routes node's attributes: the pruning fields are ExpertsSpec's."""

    layer: int
    num_experts: int
    beta: float = 0.0
    top_p: float = 1.0
    protect_fraction: float = 0.0
    keep_experts: tuple[int, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "keep_experts", tuple(int(e) for e in self.keep_experts))

    @property
    def prunes(self) -> bool:
        return self.beta > 0 or self.top_p < 1


# the routing changes of a plan (moec.policy.layer_routing) a Routes node takes, rather than the Experts node
PRUNING_FIELDS = frozenset(f.name for f in dataclasses.fields(RoutesSpec)) - {"layer", "num_experts"}


def pruned_routes(hidden, top_k_index, top_k_weights, spec: RoutesSpec) -> tuple[np.ndarray, np.ndarray]:
    """What a Routes node computes: (top_k_index, top_k_weights)."""
    from moec.ops.dynamic_gating import importance, prune

    if not spec.prunes:
        return np.asarray(top_k_index), np.asarray(top_k_weights, np.float32)
    weights, keep = prune(np.asarray(top_k_weights, np.float32), spec, importance(np.asarray(hidden, np.float32)),
                          top_k_index=top_k_index)
    return np.where(keep, top_k_index, spec.num_experts), weights


def op_schema():
    """An `onnx.defs.OpSchema` for moec::Routes, which onnxscript needs to emit the node."""
    from onnx.defs import OpSchema

    return OpSchema(
        OP_TYPE, DOMAIN, 1,
        doc=__doc__,
        inputs=[OpSchema.FormalParameter("hidden", "T"), OpSchema.FormalParameter("top_k_index", "I"),
                OpSchema.FormalParameter("top_k_weights", "W")],
        outputs=[OpSchema.FormalParameter("top_k_index", "I"), OpSchema.FormalParameter("top_k_weights", "W")],
        type_constraints=[("T", FLOATS, "activations"), ("W", FLOATS, "routing weights"),
                          ("I", ["tensor(int64)"], "expert indices")],
        attributes=RoutesSpec.attribute_schemas(),
    )
