"""The `moec::Experts` op: one node per sparse layer, the compiler's high-level IR.

The family's own router, traced from transformers' modeling code, decides which experts each
token uses; this node computes them. It is what `transformers.integrations.moe`'s experts
interface calls (`experts(hidden_states, top_k_index, top_k_weights)`), as one node.

Inputs:
    hidden [T, H]; top_k_index [T, k] (int64); top_k_weights [T, k];
    gate_up: the experts' stacked first projection, as the family stores it: [E, 2I, H] (gate and
        up stacked on the output axis), [E, H, 2I] when `transposed`; when `gate` is "none" it is
        the up projection alone ([E, I, H] or [E, H, I]);
    down: [E, H, I] ([E, I, H] when `transposed`);
    optional gate_up_bias [E, 2I] (or [E, I]) and down_bias [E, H].
    The expert weights and biases may have a dtype of their own (the checkpoint's).
Attributes (`ExpertsSpec`): the layer, the weights' layout (`transposed`; `gate`: "concatenated"
(gate rows, then up rows), "interleaved" (gate, up, gate, up, ...) or "none"), the activation,
the layer's dynamic pruning (`beta`, `top_p`, `protect_fraction`, and `keep_experts`, the super
experts it never drops; see moec.ops.dynamic_gating), its `dropped` experts (no weights, never
routed to: the router's scores for them are masked before its top-k, passes/mask_dropped_experts.py)
and `sentinel`: top_k_index may name expert E, a route to no expert (the sentinel of transformers'
experts interface), which computes nothing (a moec::Routes node before it prunes routes so:
moec.ops.routes).
Activations, with g = gate and u = up (gate-less experts: act(u)):
    silu, gelu, gelu_tanh, relu, relu2   act(g) * u
    clamped_swiglu   (gpt-oss)           g' = min(g, limit), u' = clip(u, ±limit): (u' + 1) g' sigmoid(alpha g')
    clamped_silu     (DeepSeek-V4)       silu(min(g, limit)) * clip(u, ±limit)
    silu_clipped     (Ling, bailing)     min(silu(g), limit) * clip(u, ±limit)
    softcapped_swiglu (Inkling2)         cap_g(g) sigmoid(g) cap_u(u), cap(x) = c tanh(x / c)
Output: sum over the token's experts of weight x expert(hidden) [T, H].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

DOMAIN = "moec"
OP_TYPE = "Experts"
INPUT_NAMES = ("hidden", "top_k_index", "top_k_weights", "gate_up", "down", "gate_up_bias", "down_bias")
OPTIONAL_INPUTS = frozenset(("gate_up_bias", "down_bias"))
# the routed experts' weights may be stored in another dtype than the activations (a bf16 checkpoint's);
# the lowering casts one expert's slice at a time
EXPERT_INPUTS = frozenset(INPUT_NAMES[3:])
FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
# the lowered artifact's pruning interface (pure names, so the runtime can read them without onnxscript)
PRUNE_SWITCH = "prune_experts"  # run-time switch: bool scalar graph input, default true
ACTIVATIONS_OUTPUT = "expert_activations"  # per layer ".{layer}": (token, expert) pairs computed, int64
# int64 scalar graph input, default 0: only the last N positions get logits (0: all), as transformers'
# `logits_to_keep`; generation keeps 1, so a prompt does not pay the head once per token
LOGITS_TO_KEEP = "logits_to_keep"
PROJECTIONS = ("gate", "up", "down")
EXPERT_WEIGHT_PATTERN = r"layers\.(?P<layer>\d+)\.experts\.(?P<expert>\d+)\.(?P<proj>gate|up|down)_proj"
# the initializers of a layer's experts of one width computed together (com.microsoft.QMoE on CPU):
# `{prefix}.fc1.q` ... and `{prefix}.experts`, the experts the group holds
QMOE_GROUP_PATTERN = r"layers\.(?P<layer>\d+)\.experts\.(?P<bits>\d+)bit"
# products merged with their siblings (passes/merge_sibling_products.py): initializers named after
# theirs joined by MERGED_JOIN (`{a}+{b}.q` ...), and `{a}+{b}{MERGED_ROWS}` each one's rows
MERGED_JOIN, MERGED_ROWS = "+", ".split"
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "relu2", "clamped_swiglu", "clamped_silu", "silu_clipped",
               "softcapped_swiglu")
GATED_ONLY = frozenset(("clamped_swiglu", "clamped_silu", "silu_clipped", "softcapped_swiglu"))
GATE_LAYOUTS = ("concatenated", "interleaved", "none")


def qmoe_group_name(layer: int, bits: int) -> str:
    return f"layers.{layer}.experts.{bits}bit"


def expert_weight_name(layer: int, expert: int, proj: str) -> str:
    """How a lowered graph names one routed expert's projection weight."""
    return f"layers.{layer}.experts.{expert}.{proj}_proj"


class NodeAttributes:
    """A frozen dataclass stored as a node's attributes."""

    def attributes(self) -> dict:
        """ONNX attribute values (bools as ints, as ONNX has no bool attribute; tuples as lists, and
        left out when empty, as an empty list has no ONNX type)."""
        def value(v):
            return int(v) if isinstance(v, bool) else list(v) if isinstance(v, tuple) else v

        return {f.name: value(v) for f in dataclasses.fields(self) if (v := getattr(self, f.name)) != ()}

    @classmethod
    def from_attributes(cls, attrs: dict):
        kinds = {f.name: f.type for f in dataclasses.fields(cls)}
        return cls(**{k: (bool(v) if kinds[k] == "bool" else v) for k, v in attrs.items() if k in kinds})

    @classmethod
    def attribute_schemas(cls) -> list:
        """The fields as `onnx.defs.OpSchema.Attribute`s, for an op schema onnxscript emits nodes by."""
        from onnx.defs import OpSchema

        kinds = {"int": OpSchema.AttrType.INT, "bool": OpSchema.AttrType.INT, "float": OpSchema.AttrType.FLOAT,
                 "str": OpSchema.AttrType.STRING, "tuple[int, ...]": OpSchema.AttrType.INTS}
        return [OpSchema.Attribute(f.name, kinds[f.type], f.name) for f in dataclasses.fields(cls)]


@dataclass(frozen=True)
class ExpertsSpec(NodeAttributes):
    """Layout, activation and pruning of one sparse layer's experts; stored as the node's attributes."""

    layer: int
    activation: str = "silu"
    gate: str = "concatenated"
    transposed: bool = False
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    gate_softcap: float = 1.0
    up_softcap: float = 1.0
    beta: float = 0.0              # dynamic pruning (moec.ops.dynamic_gating); 0 = plain top-k
    top_p: float = 1.0             # the top-p rule; 1 = off
    protect_fraction: float = 0.0
    keep_experts: tuple[int, ...] = ()  # never pruned (super experts)
    dropped: tuple[int, ...] = ()       # no weights, never routed to
    sentinel: bool = False              # top_k_index may name expert E: no expert

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"experts activation {self.activation!r} is not one of {ACTIVATIONS}")
        if self.gate not in GATE_LAYOUTS:
            raise ValueError(f"experts gate layout {self.gate!r} is not one of {GATE_LAYOUTS}")
        if self.activation in GATED_ONLY and self.gate == "none":
            raise ValueError(f"{self.activation} needs a gate projection")
        if not (0.0 <= self.beta <= 1.0 and 0.0 < self.top_p <= 1.0 and 0.0 <= self.protect_fraction <= 1.0):
            raise ValueError(f"pruning beta and protect_fraction must be in [0, 1] and top_p in (0, 1], got "
                             f"{self.beta}, {self.protect_fraction}, {self.top_p}")
        object.__setattr__(self, "keep_experts", tuple(int(e) for e in self.keep_experts))
        object.__setattr__(self, "dropped", tuple(int(e) for e in self.dropped))

    @property
    def prunes(self) -> bool:
        """Whether the layer prunes dynamically (a moec.DynamicGating in its lowering)."""
        return self.beta > 0 or self.top_p < 1

    @property
    def projections(self) -> tuple[str, ...]:
        """The expert's projections: gate, up, down, or just up and down when it has no gate."""
        return PROJECTIONS if self.gate != "none" else PROJECTIONS[1:]


def op_schema():
    """An `onnx.defs.OpSchema` for moec::Experts, which onnxscript needs to emit the node."""
    from onnx.defs import OpSchema

    def formal(name):
        option = OpSchema.FormalParameterOption.Optional if name in OPTIONAL_INPUTS else \
            OpSchema.FormalParameterOption.Single
        kind = "W" if name in EXPERT_INPUTS else "I" if name == "top_k_index" else "T"
        return OpSchema.FormalParameter(name, kind, param_option=option)

    return OpSchema(
        OP_TYPE, DOMAIN, 1,
        doc=__doc__,
        inputs=[formal(n) for n in INPUT_NAMES],
        outputs=[OpSchema.FormalParameter("output", "T")],
        type_constraints=[("T", FLOATS, "activations"), ("W", FLOATS, "routed expert weights"),
                          ("I", ["tensor(int64)"], "expert indices")],
        attributes=ExpertsSpec.attribute_schemas(),
    )


# --------------------------------------------------------------------------- NumPy reference

@dataclass
class Expert:
    """One expert's weights in [out, in] layout (gate None for gate-less experts), float32."""

    up: np.ndarray
    down: np.ndarray
    gate: np.ndarray | None = None
    up_bias: np.ndarray | None = None
    down_bias: np.ndarray | None = None
    gate_bias: np.ndarray | None = None


def split_gate_up(stacked, spec: ExpertsSpec, axis: int) -> tuple:
    """(gate, up) of a gate_up slice along its output `axis`, by the layout; gate None without one."""
    if spec.gate == "none":
        return None, stacked
    half = stacked.shape[axis] // 2
    parts = (slice(0, None, 2), slice(1, None, 2)) if spec.gate == "interleaved" else (slice(half), slice(half, None))
    return tuple(stacked[(slice(None),) * axis + (part,)] for part in parts)


def expert_projection(stacked: dict, expert: int, proj: str, spec: ExpertsSpec):
    """Expert `expert`'s `proj` weight [out, in] (a view in the stored dtype) from the node's stacked
    inputs (`stacked["gate_up"]`, `stacked["down"]`, arrays indexable by expert)."""
    if proj == "down":
        weight = stacked["down"][expert]
    else:
        weight = split_gate_up(stacked["gate_up"][expert], spec, axis=1 if spec.transposed else 0)[proj == "up"]
    return weight.T if spec.transposed else weight


def expert_bias(stacked: dict, expert: int, proj: str, spec: ExpertsSpec):
    """Expert `expert`'s `proj` bias [out], or None."""
    if proj == "down":
        bias = stacked.get("down_bias")
        return None if bias is None else bias[expert]
    bias = stacked.get("gate_up_bias")
    return None if bias is None else split_gate_up(bias[expert], spec, axis=0)[proj == "up"]


def expert_weights(stacked: dict, expert: int, spec: ExpertsSpec) -> Expert:
    """Expert `expert` of the node's stacked inputs, upcast to float32. Each stacked input is
    indexed once, so gate and up are views of one upcast gate_up slice."""
    f32 = lambda a: None if a is None else np.asarray(a, dtype=np.float32)  # noqa: E731
    one = {name: None if t is None else f32(t[expert])[None] for name, t in stacked.items()}
    parts = {p: expert_projection(one, 0, p, spec) for p in spec.projections}
    biases = {f"{p}_bias": expert_bias(one, 0, p, spec) for p in spec.projections}
    return Expert(**parts, **biases)


def activation(x: np.ndarray, name: str) -> np.ndarray:
    if name == "silu":
        return x / (1.0 + np.exp(-x))
    if name == "gelu":
        from scipy.special import erf

        return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))
    if name == "gelu_tanh":
        return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))
    relu = np.maximum(x, 0)
    return relu * relu if name == "relu2" else relu


def expert_hidden(x: np.ndarray, expert: Expert, spec: ExpertsSpec) -> np.ndarray:
    """An expert's activation on its tokens x [n, H]: [n, I]."""
    def linear(w, b):
        return x @ w.T + (0 if b is None else b)

    up = linear(expert.up, expert.up_bias)
    if expert.gate is None:
        return activation(up, spec.activation).astype(np.float32)
    gate = linear(expert.gate, expert.gate_bias)
    sigmoid = lambda v: 1.0 / (1.0 + np.exp(-v))  # noqa: E731
    if spec.activation == "softcapped_swiglu":
        cap = lambda v, c: c * np.tanh(v / c)  # noqa: E731
        return (cap(gate, spec.gate_softcap) * sigmoid(gate) * cap(up, spec.up_softcap)).astype(np.float32)
    if spec.activation in ("clamped_swiglu", "clamped_silu"):
        gate = np.minimum(gate, spec.swiglu_limit)
        up = np.clip(up, -spec.swiglu_limit, spec.swiglu_limit)
        if spec.activation == "clamped_swiglu":
            return ((up + 1.0) * gate * sigmoid(spec.swiglu_alpha * gate)).astype(np.float32)
        return (activation(gate, "silu") * up).astype(np.float32)
    if spec.activation == "silu_clipped":
        limit = spec.swiglu_limit
        return (np.minimum(activation(gate, "silu"), limit) * np.clip(up, -limit, limit)).astype(np.float32)
    return (activation(gate, spec.activation) * up).astype(np.float32)


def expert_ffn(x: np.ndarray, expert: Expert, spec: ExpertsSpec) -> np.ndarray:
    """One expert's feed-forward on its tokens x [n, H]."""
    return expert_hidden(x, expert, spec) @ expert.down.T + (0 if expert.down_bias is None else expert.down_bias)


def experts_reference(hidden, top_k_index, top_k_weights, experts: Callable[[int], Expert], num_experts: int, *,
                      spec: ExpertsSpec) -> np.ndarray:
    """What a moec::Experts node computes; every lowering is tested against this. `experts(e)` gives
    expert e's weights, made only while it runs (see moec.reference for quantized ones)."""
    from moec.ops.dynamic_gating import importance, prune

    hidden = np.asarray(hidden, np.float32)
    weights, keep = prune(np.asarray(top_k_weights, np.float32), spec, importance(hidden), top_k_index=top_k_index)
    out = np.zeros_like(hidden)
    for e in range(num_experts):
        tokens, rank = np.nonzero((top_k_index == e) & keep)
        if tokens.size == 0:
            continue
        y = expert_ffn(hidden[tokens], experts(e), spec)
        np.add.at(out, tokens, y * weights[tokens, rank][:, None])
    return out


def stacked_reference(hidden, top_k_index, top_k_weights, gate_up, down, gate_up_bias=None, down_bias=None, *,
                      spec: ExpertsSpec) -> np.ndarray:
    """The reference on the node's own inputs (stacked weights as stored)."""
    stacked = {"gate_up": gate_up, "down": down, "gate_up_bias": gate_up_bias, "down_bias": down_bias}
    return experts_reference(hidden, top_k_index, top_k_weights, lambda e: expert_weights(stacked, e, spec),
                             len(down), spec=spec)
