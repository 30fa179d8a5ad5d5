"""moec's front end: transformers' experts interface.

Every modern MoE family in transformers decorates its experts class with
`transformers.integrations.moe.use_experts_implementation`, whose forward
`experts(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])` dispatches on
`config._experts_implementation` through `ALL_EXPERTS_FUNCTIONS`. moec registers two
implementations there, so the family's own router, shared experts, attention and norms run
unchanged and only the routed experts are moec's:
    "moec"            the `moec::experts` torch custom op, which torch.onnx turns into one
                      `moec::Experts` node per sparse layer (moec.trace);
    "moec_reference"  the node's NumPy reference, computing each expert with its weights as the
                      artifact has them (quantized and dequantized, pruned as planned: set on the
                      module by moec.reference) — the PyTorch side of every numeric check.
What the class says of its weights (layout, activation) becomes the node's `ExpertsSpec`; a gate
function moec has no entry for is refused by name. A module that takes the routing and calls the
interface its own way (Ergo's, once per route) has its own call's routing pass through
`moec::routes` (a `moec::Routes` node: moec.ops.routes), where the plan's pruning acts.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from moec.errors import MoecError, Unsupported
from moec.ops.moe import ExpertsSpec, expert_ffn, expert_weight_name, expert_weights, experts_reference
from moec.ops.routes import RoutesSpec, pruned_routes

TRACE_IMPLEMENTATION = "moec"
REFERENCE_IMPLEMENTATION = "moec_reference"

# the experts' activation, by the class (or function name) of the module's `act_fn`
ACT_FNS = {"SiLUActivation": "silu", "SiLU": "silu", "silu": "silu", "GELUActivation": "gelu", "gelu": "gelu",
               "GELUTanh": "gelu_tanh", "NewGELUActivation": "gelu_tanh", "FastGELUActivation": "gelu_tanh",
               "PytorchGELUTanh": "gelu_tanh", "ReLU": "relu", "relu": "relu", "ReLUSquaredActivation": "relu2"}
# classes that compute their gate themselves (`_apply_gate`): what it computes, by qualified name
GATE_FUNCTIONS = {
    "GptOssExperts._apply_gate": lambda m: dict(activation="clamped_swiglu", gate="interleaved",
                                                swiglu_alpha=float(m.alpha), swiglu_limit=float(m.limit)),
    "MiniMaxM3VLExperts._apply_gate": lambda m: dict(activation="clamped_swiglu", swiglu_alpha=float(m.swiglu_alpha),
                                                     swiglu_limit=float(m.swiglu_limit)),
    "DeepseekV4Experts._apply_gate": lambda m: dict(activation="clamped_silu", swiglu_limit=float(m.limit)),
    "HYV4Experts._apply_gate": lambda m: dict(activation="clamped_silu", swiglu_limit=float(m.swiglu_limit)),
    "BeamExperts._apply_gate": lambda m: dict(activation=_activation(m)),  # act(gate) * up, in float32
    "BailingHybridExperts._apply_gate": lambda m: _clipped(m, m.limit),
    "Inkling2Experts._apply_gate": lambda m: dict(activation="softcapped_swiglu", **_softcaps(m.act_fn)),
    "Inkling2LoopExperts._apply_gate": lambda m: dict(activation="softcapped_swiglu", **_softcaps(m.act_fn)),
}


def _clipped(module: nn.Module, limit: float | None) -> dict:
    """act(gate) clipped above at `limit` times up clipped to ±limit; no limit: act(gate) * up."""
    activation = _activation(module)
    if limit is None:
        return dict(activation=activation)
    if activation != "silu":
        raise ValueError(f"{type(module).__name__} clips {activation}, for which moec has no entry")
    return dict(activation="silu_clipped", swiglu_limit=float(limit))


def _softcaps(act) -> dict:
    return {"gate_softcap": float(act.gate_softcap.softcap), "up_softcap": float(act.up_softcap.softcap)}


def _activation(module: nn.Module) -> str:
    """The moec name of the experts' `act_fn`; ValueError if moec has no entry for it."""
    act = getattr(module, "act_fn", None)
    kind = getattr(act, "__name__", None) if callable(act) and not isinstance(act, nn.Module) else type(act).__name__
    if isinstance(act, nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    if kind not in ACT_FNS:
        raise ValueError(f"{type(module).__name__} uses the activation {kind}, for which moec has no entry")
    return ACT_FNS[kind]


@dataclass
class ExpertsLayer:
    """One sparse layer, as the rest of moec knows it."""

    path: str              # the experts module's path, e.g. "model.layers.3.mlp.experts"
    spec: ExpertsSpec
    num_experts: int
    hidden_size: int
    intermediate_size: int
    shared_expert: bool    # the MoE block also has a shared expert (computed by the family's code)
    top_k: int | None = None  # the router's k, read off the traced graph (moec.trace_cache.traced)

    @property
    def layer(self) -> int:
        return self.spec.layer

    @property
    def block_path(self) -> str:
        """The MoE block holding the experts, the router and any shared expert."""
        return self.path.rpartition(".")[0]

    def expert_parameters(self) -> int:
        """Parameters of one expert's projections."""
        return len(self.spec.projections) * self.hidden_size * self.intermediate_size


def is_experts_module(module: nn.Module) -> bool:
    """Whether transformers' experts interface dispatches this module's forward."""
    return all(hasattr(module, flag) for flag in ("has_gate", "is_transposed", "is_concatenated", "has_bias"))


def stacked_weights(module: nn.Module) -> dict[str, torch.Tensor | None]:
    """The experts module's stacked tensors under the node's input names."""
    first = "gate_up_proj" if module.has_gate else "up_proj"
    return {"gate_up": getattr(module, first), "down": module.down_proj,
            "gate_up_bias": getattr(module, f"{first}_bias", None) if module.has_bias else None,
            "down_bias": getattr(module, "down_proj_bias", None) if module.has_bias else None}


def experts_spec(module: nn.Module, layer: int, path: str, model_type: str) -> ExpertsSpec:
    """The node attributes of an experts module; Unsupported for what moec cannot express."""
    from transformers.integrations.moe import _default_apply_gate

    name = type(module).__name__
    if getattr(module, "has_post_expert_norm", False):
        raise Unsupported(model_type, "experts", f"{path} ({name}) normalizes each expert's output "
                          "(has_post_expert_norm), which moec's experts op does not express")
    layout = {"gate": "concatenated" if module.has_gate else "none", "transposed": bool(module.is_transposed)}
    apply_gate = type(module)._apply_gate
    try:
        if module.has_gate and apply_gate is not _default_apply_gate:
            entry = GATE_FUNCTIONS.get(apply_gate.__qualname__)
            if entry is None:
                raise Unsupported(model_type, "experts", f"{path} ({name}) computes its gate with "
                                  f"{apply_gate.__qualname__}, for which moec has no entry")
            return ExpertsSpec(layer=layer, **{**layout, **entry(module)})
        return ExpertsSpec(layer=layer, activation=_activation(module), **layout)
    except ValueError as e:  # an activation moec has no entry for
        raise Unsupported(model_type, "experts", f"{path}: {e}") from None


def experts_layers(model: nn.Module) -> list[ExpertsLayer]:
    """The model's sparse layers in layer order (each experts module tagged with its spec, which
    the registered implementations read)."""
    layers = []
    for path, module in model.named_modules():
        if not is_experts_module(module):
            continue
        found = re.search(r"(?:^|\.)layers\.(\d+)\.", path)
        if found is None:
            raise MoecError(f"{path} ({type(module).__name__}) is not inside a decoder layer (layers.N)")
        spec = experts_spec(module, int(found[1]), path, model.config.model_type)
        module.moec_spec = spec
        stacked = stacked_weights(module)
        down = stacked["down"]
        if routes_for_itself(module) and not hasattr(module, "moec_routes"):
            module.moec_routes = RoutesSpec(spec.layer, int(down.shape[0]))
            module.register_forward_pre_hook(_prune_own_routes, with_kwargs=True)
        hidden, intermediate = (down.shape[2], down.shape[1]) if spec.transposed else (down.shape[1], down.shape[2])
        block = model.get_submodule(path.rpartition(".")[0])
        shared = any(child.startswith("shared") for child, _ in block.named_children())
        layers.append(ExpertsLayer(path, spec, int(down.shape[0]), int(hidden), int(intermediate), shared))
    return sorted(layers, key=lambda entry: entry.layer)


def checkpoint_experts_layers(stream) -> list[ExpertsLayer]:
    """experts_layers of a StreamingModel's skeleton; Unsupported when the checkpoint has none (a dense
    model, or a family whose installed transformers does not run its experts through the interface:
    LongCat-Flash before 5.25)."""
    layers = experts_layers(stream.model)
    if not layers:
        raise Unsupported(stream.checkpoint.model_type, "experts", f"{stream.checkpoint.path} (model_type "
                          f"{stream.checkpoint.model_type!r}) has no sparse MoE layers (no experts module using "
                          "transformers' experts interface)")
    return layers


def set_implementation(model: nn.Module, name: str) -> None:
    """Route every experts module of `model` through one of moec's implementations."""
    _register()
    model.set_experts_implementation(name)


CALL_ARGUMENTS = ("hidden_states", "top_k_index", "top_k_weights")


def call_arguments(args: tuple, kwargs: dict) -> tuple:
    """(hidden_states, top_k_index, top_k_weights) of an experts call, however they were passed
    (what a forward pre-hook registered with_kwargs receives)."""
    return (*args, *(kwargs[name] for name in CALL_ARGUMENTS[len(args):]))[:3]


class RoutingMask(torch.overrides.TorchFunctionMode):
    """While active, no top-k over the `num_experts` experts selects one in `dropped`: a torch.topk
    along the last axis (of the experts, and perhaps more options after them: Zaya's "no expert")
    reads its scores with the dropped experts at -inf, and so do the indices
    of a max or argmax there (a max's values stay as computed). That is what
    passes/mask_dropped_experts.py does to the router's TopK or ArgMax in the graph, so the PyTorch
    reference and calibration route as the artifact does, through the family's own router code.
    With `per_token` (an expert per token of the call, in order) each token drops its own expert
    instead (calibration's width 0, every expert's tokens in one call); a selection over another
    number of tokens is left as it is. `selections` counts the selections masked."""

    SELECTIONS = {torch.topk: "topk", torch.Tensor.topk: "topk", torch.max: "max", torch.Tensor.max: "max",
                  torch.argmax: "argmax", torch.Tensor.argmax: "argmax"}

    def __init__(self, num_experts: int, dropped=(), per_token: np.ndarray | None = None):
        super().__init__()
        self.num_experts, self.dropped, self.per_token = num_experts, list(dropped), per_token
        self.selections = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = self.SELECTIONS.get(func)
        if kind is None or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point():
            return func(*args, **kwargs)
        scores = args[0]
        if kind == "topk":  # topk(input, k, dim=-1)
            dim = kwargs.get("dim", args[2] if len(args) > 2 else -1)
        else:  # max(input, dim) / argmax(input, dim)
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
        if type(dim) is not int or dim not in (-1, scores.dim() - 1) or scores.shape[-1] < self.num_experts:
            return func(*args, **kwargs)  # torch.max(a, b) and the like: not a selection
        if self.per_token is None:
            mask = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)  # the experts, then other options
            mask[self.dropped] = True
        elif scores.numel() // scores.shape[-1] == len(self.per_token):
            mask = torch.zeros(len(self.per_token), scores.shape[-1], dtype=torch.bool, device=scores.device)
            mask[torch.arange(len(self.per_token)), torch.from_numpy(self.per_token)] = True
            mask = mask.reshape(scores.shape)
        else:
            return func(*args, **kwargs)
        masked = scores.masked_fill(mask, float("-inf"))
        self.selections += 1
        if kind == "max":
            values = func(*args, **kwargs).values
            return torch.return_types.max((values, func(masked, *args[1:], **kwargs).indices))
        return func(masked, *args[1:], **kwargs)


def selection_not_found(block: str, num_experts: int) -> MoecError:
    """The error for a MoE block in which RoutingMask saw no selection of experts."""
    return MoecError(f"{block} selects its experts outside the MoE block (no top-k over its {num_experts} experts "
                     "there), so moec cannot drop experts in it")


def drop_experts(block: nn.Module, num_experts: int, dropped) -> list:
    """Hooks making `block` (a MoE block: router and experts) route under a RoutingMask; the
    handles to remove them. A block whose forward selects no experts raises MoecError."""
    mode = RoutingMask(num_experts, dropped)

    def enter(*_):
        mode.selections = 0
        mode.__enter__()

    def leave(*_):
        mode.__exit__(None, None, None)
        if not mode.selections:
            raise selection_not_found(type(block).__name__, num_experts)

    return [block.register_forward_pre_hook(enter), block.register_forward_hook(leave, always_call=True)]


# --------------------------------------------------------------------------- the torch op

@torch.library.custom_op("moec::experts", mutates_args=())
def experts_op(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, gate_up: torch.Tensor,
               down: torch.Tensor, gate_up_bias: torch.Tensor | None, down_bias: torch.Tensor | None, layer: int,
               activation: str, gate: str, transposed: bool, swiglu_alpha: float, swiglu_limit: float,
               gate_softcap: float, up_softcap: float, beta: float, top_p: float, protect_fraction: float,
               keep_experts: list[int], dropped: list[int], sentinel: bool) -> torch.Tensor:
    """Eager body: the NumPy reference, so PyTorch and ONNX share one definition of the op."""
    from moec.ops.moe import stacked_reference

    spec = ExpertsSpec(layer, activation, gate, transposed, swiglu_alpha, swiglu_limit, gate_softcap, up_softcap,
                       beta, top_p, protect_fraction, tuple(keep_experts), tuple(dropped), sentinel)
    as_np = lambda t: None if t is None else t.detach().float().cpu().numpy()  # noqa: E731
    out = stacked_reference(*(as_np(t) for t in (hidden, top_k_index, top_k_weights, gate_up, down, gate_up_bias,
                                                  down_bias)), spec=spec)
    return torch.from_numpy(out).to(hidden.dtype)


@experts_op.register_fake
def _(hidden, *args, **kwargs):
    return torch.empty_like(hidden)


@torch.library.custom_op("moec::routes", mutates_args=())
def routes_op(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, layer: int,
              num_experts: int, beta: float, top_p: float, protect_fraction: float,
              keep_experts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager body: moec::Routes's NumPy reference (moec.ops.routes)."""
    spec = RoutesSpec(layer, num_experts, beta, top_p, protect_fraction, tuple(keep_experts))
    index, weights = pruned_routes(hidden.detach().float().reshape(-1, hidden.shape[-1]).numpy(),
                                   top_k_index.numpy(), top_k_weights.detach().float().numpy(), spec)
    return torch.from_numpy(np.ascontiguousarray(index)), torch.from_numpy(weights).to(top_k_weights.dtype)


@routes_op.register_fake
def _(hidden, top_k_index, top_k_weights, *args, **kwargs):
    return torch.empty_like(top_k_index), torch.empty_like(top_k_weights)


def routes_for_itself(module: nn.Module) -> bool:
    """Whether the experts module's own forward takes the routing and calls the experts interface its
    own way (Ergo's: once per route) rather than being the interface's dispatch, which
    `use_experts_implementation` wraps around the class's forward."""
    return not hasattr(type(module).forward, "__wrapped__")


def _prune_own_routes(module, args, kwargs):
    """Forward pre-hook of an experts module that routes for itself: its routing through one
    moec::routes call (a moec::Routes node when traced, whose attributes the plan sets later); in
    eager runs only where `module.moec_routes` prunes."""
    routes = module.moec_routes
    if not (routes.prunes or module.config._experts_implementation == TRACE_IMPLEMENTATION):
        return None
    hidden, index, weights = call_arguments(args, kwargs)
    index, weights = torch.ops.moec.routes(hidden, index, weights, **{
        name: list(v) if isinstance(v, tuple) else v for name, v in dataclasses.asdict(routes).items()})
    return (hidden, index, weights), {name: v for name, v in kwargs.items() if name not in CALL_ARGUMENTS}


def _traced_forward(module, hidden_states, top_k_index, top_k_weights):
    """The "moec" implementation: one moec::experts call (one moec::Experts node when exported)."""
    stacked = stacked_weights(module)
    spec = {name: list(v) if isinstance(v, tuple) else v for name, v in dataclasses.asdict(module.moec_spec).items()}
    return torch.ops.moec.experts(hidden_states, top_k_index, top_k_weights, *stacked.values(), **spec)


def _reference_forward(module, hidden_states, top_k_index, top_k_weights):
    """The "moec_reference" implementation: the NumPy reference, each expert upcast (and quantized
    and dequantized where `module.moec_quantizers` has its weights) only while it runs."""
    quantizers = getattr(module, "moec_quantizers", None) or {}
    spec = module.moec_spec
    stacked = float32_views(module)

    def expert(e):
        weights = expert_weights(stacked, e, spec)
        for proj in spec.projections:
            quantizer = quantizers.get(expert_weight_name(spec.layer, e, proj))
            if quantizer is not None:
                setattr(weights, proj, quantizer(getattr(weights, proj)).dequantize())
        return weights

    x, index, weights = hidden_states.detach().float().numpy(), top_k_index.numpy(), top_k_weights.detach().float().numpy()
    known = getattr(module, "moec_known_routes", None)
    if known is not None and not spec.prunes and not spec.sentinel and known.fits(x, index):
        out = known.combine(x, index, weights, expert, spec)
    else:
        out = experts_reference(x, index, weights, expert, stacked["down"].num_experts, spec=spec)
    return torch.from_numpy(out).to(hidden_states.dtype)


@dataclass
class KnownRoutes:
    """Expert outputs already computed for the tokens of an experts call, reused where a rerun routes
    a token to the same expert again (calibration's width 0: masking one expert out of the router
    changes one of each affected token's routes, so only the expert that takes its place runs)."""

    hidden: np.ndarray   # [tokens, H]: what the experts received
    index: np.ndarray    # [tokens, k]
    outputs: np.ndarray  # [tokens, k, H]: each route's expert output, unweighted

    def fits(self, hidden: np.ndarray, index: np.ndarray) -> bool:
        """Whether a call is on these tokens (the same rows, in order: checked on a few of them)."""
        if hidden.shape != self.hidden.shape or index.shape != self.index.shape:
            return False
        rows = np.linspace(0, len(hidden) - 1, min(len(hidden), 16)).astype(int)
        return np.allclose(hidden[rows], self.hidden[rows], rtol=1e-5, atol=1e-6)

    def combine(self, hidden: np.ndarray, index: np.ndarray, weights: np.ndarray, expert, spec) -> np.ndarray:
        """The weighted sum of each token's routes, computing only the (token, expert) pairs not known."""
        match = index[:, :, None] == self.index[:, None, :]
        first = match & (np.cumsum(match, axis=-1) == 1)  # a route's first known place (LongCat repeats experts)
        known = match.any(-1)
        # each known route's weight moved onto its place among the known outputs: one batched product
        out = np.matmul(np.einsum("nk,nkj->nj", weights, first.astype(np.float32))[:, None], self.outputs)[:, 0]
        for e in np.unique(index[~known]):
            tokens, rank = np.nonzero((index == e) & ~known)
            np.add.at(out, tokens, expert_ffn(hidden[tokens], expert(int(e)), spec) * weights[tokens, rank][:, None])
        return out


class StackedView:
    """A stacked tensor indexed by expert into float32 NumPy (a bf16 checkpoint's experts upcast
    one at a time, never a whole layer)."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self.num_experts = tensor.shape[0]

    def __getitem__(self, expert: int) -> np.ndarray:
        return self.tensor[expert].detach().float().numpy()


def float32_views(module: nn.Module) -> dict[str, StackedView | None]:
    """The experts module's stacked tensors as StackedViews, under the node's input names."""
    return {name: None if t is None else StackedView(t) for name, t in stacked_weights(module).items()}


def _register() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(TRACE_IMPLEMENTATION, _traced_forward)
    ALL_EXPERTS_FUNCTIONS.register(REFERENCE_IMPLEMENTATION, _reference_forward)
