"""The `moec::MoE` op: one node per sparse layer, the compiler's high-level IR.

Inputs (torch weight layout, [out, in]):
    hidden [T, H], router_logits [T, E], gate [E, I, H], up [E, I, H], down [E, H, I],
    optional gate_bias [E, I], up_bias [E, I], down_bias [E, H], score_bias [E];
    the expert weights and biases may have a dtype of their own (the checkpoint's).
Output: the routed experts' weighted sum [T, H] (shared experts stay outside the node).

Every supported family's routing is one point in `MoESpec`, and so is its dynamic pruning
(`beta`, `protect_fraction`; see moec.ops.dynamic_gating):
    scoring="softmax"     softmax over all experts, top-k, optional renormalisation
                          (Mixtral, Qwen, OLMoE; top-k-then-softmax families such as
                          GraniteMoE and gpt-oss are softmax + normalize, which is identical)
    scoring="sigmoid"     sigmoid scores; selection on score + score_bias, restricted to the
                          best `topk_group` of `n_group` groups; weights from the plain scores,
                          optional renormalisation, times `scaling` (DeepSeek-V3)
    scoring="sparsemixer" PhiMoE's two-step masked softmax (top-2, no normalization)
and the expert's activation is "silu" (act(gate) * up) or "clamped_swiglu" (gpt-oss).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

DOMAIN = "moec"
OP_TYPE = "MoE"
INPUT_NAMES = (
    "hidden", "router_logits", "gate", "up", "down",
    "gate_bias", "up_bias", "down_bias", "score_bias",
)
OPTIONAL_INPUTS = frozenset(INPUT_NAMES[5:])
# the routed experts' weights may be stored in another dtype than the activations (a bf16 checkpoint's);
# the lowering casts one expert's slice at a time
EXPERT_INPUTS = frozenset(("gate", "up", "down", "gate_bias", "up_bias", "down_bias"))
FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
SCORINGS = ("softmax", "sigmoid", "sparsemixer")
# the lowered artifact's pruning interface (pure names, so the runtime can read them without onnxscript)
PRUNE_SWITCH = "prune_experts"  # run-time switch: bool scalar graph input, default true
ACTIVATIONS_OUTPUT = "expert_activations"  # per layer ".{layer}": (token, expert) pairs computed, int64
PROJECTIONS = ("gate", "up", "down")
EXPERT_WEIGHT_PATTERN = r"layers\.(?P<layer>\d+)\.experts\.(?P<expert>\d+)\.(?P<proj>gate|up|down)_proj"


def expert_weight_name(layer: int, expert: int, proj: str) -> str:
    """How a lowered graph names one routed expert's projection weight."""
    return f"layers.{layer}.experts.{expert}.{proj}_proj"
ACTIVATIONS = ("silu", "clamped_swiglu")


@dataclass(frozen=True)
class MoESpec:
    """Routing and expert semantics of one sparse layer; stored as the node's attributes."""

    layer: int
    top_k: int
    scoring: str = "softmax"
    normalize: bool = True
    scaling: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    jitter_eps: float = 0.0
    activation: str = "silu"
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    beta: float = 0.0              # dynamic pruning (moec.ops.dynamic_gating); 0 = plain top-k
    protect_fraction: float = 0.0

    def __post_init__(self):
        if self.scoring not in SCORINGS:
            raise ValueError(f"MoE scoring {self.scoring!r} is not one of {SCORINGS}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"MoE activation {self.activation!r} is not one of {ACTIVATIONS}")
        if self.scoring == "sparsemixer" and (self.top_k != 2 or self.normalize):
            raise ValueError("sparsemixer routing is defined for top_k = 2 without normalization only")
        if not (0.0 <= self.beta <= 1.0 and 0.0 <= self.protect_fraction <= 1.0):
            raise ValueError(f"pruning beta and protect_fraction must be in [0, 1], got {self.beta}, "
                             f"{self.protect_fraction}")

    def attributes(self) -> dict:
        """ONNX attribute values (bools as ints, as ONNX has no bool attribute)."""
        return {f.name: (int(v) if isinstance(v := getattr(self, f.name), bool) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_attributes(cls, attrs: dict) -> "MoESpec":
        kinds = {f.name: f.type for f in dataclasses.fields(cls)}
        return cls(**{k: (bool(v) if kinds[k] == "bool" else v) for k, v in attrs.items() if k in kinds})


def op_schema():
    """An `onnx.defs.OpSchema` for moec::MoE, which onnxscript needs to emit the node."""
    from onnx.defs import OpSchema

    def formal(name):
        option = OpSchema.FormalParameterOption.Optional if name in OPTIONAL_INPUTS else \
            OpSchema.FormalParameterOption.Single
        return OpSchema.FormalParameter(name, "W" if name in EXPERT_INPUTS else "T", param_option=option)

    attr_types = {int: OpSchema.AttrType.INT, bool: OpSchema.AttrType.INT,
                  float: OpSchema.AttrType.FLOAT, str: OpSchema.AttrType.STRING}
    hints = {"int": int, "bool": bool, "float": float, "str": str}
    return OpSchema(
        OP_TYPE, DOMAIN, 1,
        doc=__doc__,
        inputs=[formal(n) for n in INPUT_NAMES],
        outputs=[OpSchema.FormalParameter("output", "T")],
        type_constraints=[("T", FLOATS, "activations"), ("W", FLOATS, "routed expert weights")],
        attributes=[OpSchema.Attribute(f.name, attr_types[hints[f.type]], f.name)
                    for f in dataclasses.fields(MoESpec)],
    )


# --------------------------------------------------------------------------- NumPy reference

def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores per row, ties to the lower index (ONNX TopK's rule)."""
    return np.argsort(-scores, axis=-1, kind="stable")[:, :k]


def _sparsemixer(logits: np.ndarray, jitter_eps: float):
    """PhiMoE eval-mode routing: each pick is a softmax over the logits near the current max."""
    weights, picks = [], []
    masked = logits.copy()
    for _ in range(2):
        best = np.max(masked, axis=-1, keepdims=True)
        pick = np.argmax(masked, axis=-1)[:, None]
        factor = np.maximum(np.abs(logits), best)
        with np.errstate(divide="ignore", invalid="ignore"):
            far = (best - logits) / factor > 2 * jitter_eps
        gates = _softmax(np.where(far, -np.inf, masked))
        weights.append(np.take_along_axis(gates, pick, axis=-1))
        picks.append(pick)
        np.put_along_axis(masked, pick, -np.inf, axis=-1)
    return np.concatenate(weights, axis=-1), np.concatenate(picks, axis=-1)


def route(logits: np.ndarray, spec: MoESpec, score_bias: np.ndarray | None = None):
    """Routing reference: (weights [T, k], expert indices [T, k])."""
    logits = logits.astype(np.float32)
    if spec.scoring == "sparsemixer":
        weights, indices = _sparsemixer(logits, spec.jitter_eps)
        return (weights * np.float32(spec.scaling)).astype(np.float32), indices
    if spec.scoring == "softmax":
        scores = _softmax(logits)
        choice = scores
    else:
        scores = 1.0 / (1.0 + np.exp(-logits))
        choice = scores + (0.0 if score_bias is None else score_bias)
        if spec.n_group > 1:
            tokens, experts = choice.shape
            grouped = choice.reshape(tokens, spec.n_group, experts // spec.n_group)
            group_scores = -np.sort(-grouped, axis=-1)[..., :2].sum(-1)
            keep = np.zeros((tokens, spec.n_group), bool)
            np.put_along_axis(keep, _top_k(group_scores, spec.topk_group), True, axis=-1)
            choice = np.where(np.repeat(keep, experts // spec.n_group, axis=-1), choice, -np.inf)
    indices = _top_k(choice, spec.top_k)
    weights = np.take_along_axis(scores, indices, axis=-1)
    if spec.normalize:
        weights = weights / (weights.sum(-1, keepdims=True) + (1e-20 if spec.scoring == "sigmoid" else 0.0))
    return (weights * spec.scaling).astype(np.float32), indices


def expert_hidden(x, gate, up, spec: MoESpec, gate_bias=None, up_bias=None):
    """An expert's activation on its tokens x [n, H] (weights in [out, in] layout): [n, I]."""
    g = x @ gate.T + (0 if gate_bias is None else gate_bias)
    u = x @ up.T + (0 if up_bias is None else up_bias)
    if spec.activation == "silu":
        return g / (1.0 + np.exp(-g)) * u
    g = np.minimum(g, spec.swiglu_limit)
    u = np.clip(u, -spec.swiglu_limit, spec.swiglu_limit)
    return (u + 1.0) * (g / (1.0 + np.exp(-spec.swiglu_alpha * g)))


def expert_ffn(x, gate, up, down, spec: MoESpec, gate_bias=None, up_bias=None, down_bias=None):
    """One expert's feed-forward on its tokens x [n, H] with weights in [out, in] layout."""
    return expert_hidden(x, gate, up, spec, gate_bias, up_bias) @ down.T + (0 if down_bias is None else down_bias)


def moe_reference(hidden, router_logits, gate, up, down, gate_bias=None, up_bias=None,
                  down_bias=None, score_bias=None, *, spec: MoESpec) -> np.ndarray:
    """What a moec::MoE node computes; every lowering is tested against this."""
    from moec.ops.dynamic_gating import gate as dynamic_gate, importance

    weights, indices, keep = dynamic_gate(router_logits, spec, score_bias, importance(hidden))
    out = np.zeros_like(hidden, dtype=np.float32)
    pick = lambda b, e: None if b is None else b[e]  # noqa: E731
    for e in range(gate.shape[0]):
        tokens, rank = np.nonzero((indices == e) & keep)
        if tokens.size == 0:
            continue
        # down is fetched after gate and up are released: weights may be made on demand (see moec.reference)
        h = expert_hidden(hidden[tokens], gate[e], up[e], spec, pick(gate_bias, e), pick(up_bias, e))
        y = h @ down[e].T + (0 if down_bias is None else down_bias[e])
        np.add.at(out, tokens, y * weights[tokens, rank][:, None])
    return out.astype(hidden.dtype)
