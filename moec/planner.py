"""Expert bit-width planner: MC-MoE's pre-loading mixed-precision allocation, plus a whole-model budget.

The paper (arXiv 2410.06270, Eq. 4) gives every expert e of a MoE layer one bit width b_e and minimizes

    sum_e  f_e^alpha * w_e^beta * L_e(b_e)^gamma

where f and w are the expert's routing frequency and summed routing weight, normalized to sum 1 within
the layer, and L_e(b) is the layer-output error when only that expert is quantized to b bits. The
released solver (precision_solver.py) uses alpha as the loss exponent (its gamma is parsed but unused),
alpha=1, beta=1.5, a per-layer budget sum_e b_e <= budget, and at least one expert at each of the two
highest widths; its published Mixtral-8x7B allocations are reproduced by scope="layer" with gamma=None.

scope="global" keeps that objective and the per-layer protection constraint but replaces the per-layer
bit budgets with one byte budget for all routed experts, so layers compete for bits. Every layer plan
fits the global problem of the same byte budget, so a global plan never predicts a higher loss.

Everything here is numpy/scipy; the MILP is solved by HiGHS through scipy.optimize.milp.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

from moec.errors import MoecError
from moec.files import write_atomic

STATS_FORMAT = "moec-stats/1"
PLAN_FORMAT = "moec-plan/1"
UNQUANTIZED_BITS = 16
FLOAT_BYTES = 4  # CPU artifacts compute in fp32: unquantized weights and MatMulNBits' scales are fp32
SCALE_BYTES = FLOAT_BYTES
# Widths a plan may hold: 1 and 3 are MC-MoE's own, 2/4/8 are onnxruntime's MatMulNBits widths.
PLAN_BIT_WIDTHS = (1, 2, 3, 4, 8, UNQUANTIZED_BITS)
SCOPES = ("global", "layer")
QUANT_METHODS = ("rtn", "gptq")
DEFAULT_NON_EXPERT = {"attention": 4, "shared_expert": 4, "dense_mlp": 4, "embedding": 8, "lm_head": 8}
PLAN_KEYS = ("format", "model", "experts", "objective", "non_expert", "quantization", "pruning")
OPTIONAL_PLAN_KEYS = ("objective",)
PRUNING_KEYS = ("layers", "protect_fraction", "target", "predicted_pruned_fraction")  # the first two required
OBJECTIVE_KEYS = ("scope", "alpha", "beta", "gamma", "candidate_bits", "require_top_widths", "budget",
                  "params_per_expert", "predicted_loss", "predicted_expert_bytes")
# Hugging Face config keys for the routed-expert count, by family (Mixtral/PhiMoE/gpt-oss, Qwen/OLMoE, DeepSeek).
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
# HiGHS stops at a 1e-4 relative gap by default; the paper's optima differ from runners-up by 2e-6.
_SOLVER_OPTIONS = {"mip_rel_gap": 0.0}
_SOLVER_COST_SCALE = 1e6  # keeps HiGHS's fixed 1e-6 absolute gap negligible whatever the loss units


class PlanError(MoecError, ValueError):
    """Bad planner input (stats, budget, plan file); the message is one line naming the bad field."""


# ---------------------------------------------------------------- stats


@dataclass(frozen=True)
class _Stats:
    """A validated stats file as arrays over the layers that have routed experts."""

    model: dict
    num_layers: int
    num_experts: int
    moe_layers: tuple[int, ...]
    widths: tuple[int, ...]  # widths with a measured loss, ascending
    frequency: np.ndarray  # (moe layers, experts), normalized per layer
    routing_weight: np.ndarray  # (moe layers, experts), normalized per layer
    quant_loss: np.ndarray  # (moe layers, experts, widths)


def load_stats(path: str | os.PathLike) -> dict:
    """Read and validate a moec-stats/1 file, so bad statistics fail here rather than inside the solver."""
    stats = _read_json(Path(path))
    _parse_stats(stats, str(path))
    return stats


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PlanError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise PlanError(f"{path}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None


def _parse_stats(stats: Any, source: str) -> _Stats:
    if not isinstance(stats, dict):
        raise PlanError(f"{source}: expected a JSON object, got {_show(stats)}")
    if stats.get("format") != STATS_FORMAT:
        raise PlanError(f"{source}: format: expected {_show(STATS_FORMAT)}, got {_show(stats.get('format'))}")
    model = stats.get("model")
    if not isinstance(model, dict):
        raise PlanError(f"{source}: model: expected an object, got {_show(model)}")
    num_layers = _positive_int(model.get("num_layers"), f"{source}: model.num_layers")
    num_experts = _positive_int(model.get("num_experts"), f"{source}: model.num_experts")
    layers = stats.get("layers")
    if not isinstance(layers, list):
        raise PlanError(f"{source}: layers: expected a list, got {_show(layers)}")

    by_index: dict[int, tuple[int, list]] = {}  # layer -> (position in the file, experts)
    seen: set[int] = set()
    for position, entry in enumerate(layers):
        where = f"{source}: layers[{position}]"
        if not isinstance(entry, dict):
            raise PlanError(f"{where}: expected an object, got {_show(entry)}")
        index = entry.get("layer")
        if type(index) is not int or not 0 <= index < num_layers:
            raise PlanError(f"{where}.layer: expected an int in [0, {num_layers}), got {_show(index)}")
        if index in seen:
            raise PlanError(f"{where}.layer: layer {index} appears twice")
        seen.add(index)
        experts = entry.get("experts")
        if experts is None:
            continue  # a dense layer (e.g. DeepSeek's first_k_dense_replace)
        if not isinstance(experts, list) or len(experts) != num_experts:
            raise PlanError(f"{where}.experts: expected a list of {num_experts} experts or null, got {_show(experts)}")
        by_index[index] = (position, experts)
    if not by_index:
        raise PlanError(f"{source}: layers: no layer has experts")

    moe_layers = tuple(sorted(by_index))
    widths: tuple[int, ...] | None = None
    frequency = np.empty((len(moe_layers), num_experts))
    routing_weight = np.empty_like(frequency)
    losses: list[list[list[float]]] = []
    for row, index in enumerate(moe_layers):
        position, experts = by_index[index]
        layer_losses = []
        for e, expert in enumerate(experts):
            where = f"{source}: layers[{position}].experts[{e}]"
            if not isinstance(expert, dict):
                raise PlanError(f"{where}: expected an object, got {_show(expert)}")
            frequency[row, e] = _statistic(expert.get("frequency"), f"{where}.frequency")
            routing_weight[row, e] = _statistic(expert.get("routing_weight"), f"{where}.routing_weight")
            table = expert.get("quant_loss")
            if not isinstance(table, dict) or not table:
                raise PlanError(f"{where}.quant_loss: expected an object of bit width -> loss, got {_show(table)}")
            expert_widths = tuple(sorted(_width_key(key, f"{where}.quant_loss") for key in table))
            if widths is None:
                widths = expert_widths
            elif expert_widths != widths:
                raise PlanError(f"{where}.quant_loss: has widths {_show(list(expert_widths))}, "
                                f"other experts have {_show(list(widths))}")
            layer_losses.append([_statistic(table[str(w)], f"{where}.quant_loss[\"{w}\"]") for w in widths])
        losses.append(layer_losses)
        for name, values in (("frequency", frequency), ("routing_weight", routing_weight)):
            total = values[row].sum()
            if total <= 0:
                raise PlanError(f"{source}: layer {index}: every expert has {name} 0, so experts cannot be weighed")
            values[row] /= total
    assert widths is not None
    return _Stats(model, num_layers, num_experts, moe_layers, widths, frequency, routing_weight, np.array(losses))


def _width_key(key: str, where: str) -> int:
    if not re.fullmatch(r"[1-9][0-9]*", key):
        raise PlanError(f"{where}: expected bit-width keys like \"2\", got {_show(key)}")
    return int(key)


def _statistic(value: Any, where: str) -> float:
    if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
        raise PlanError(f"{where}: expected a finite number >= 0, got {_show(value)}")
    return float(value)


# ---------------------------------------------------------------- sizes


def expert_bytes(params: int, bits: int, group_size: int = 128) -> int:
    """Stored bytes of one expert at `bits`, so budgets count what actually ships.

    Asymmetric RTN with groups of `group_size` along the input dimension: packed `bits`-bit codes, plus
    per group a scale of SCALE_BYTES and a `bits`-bit zero point (packed). 16 bits is unquantized, stored in fp32 like the rest of a CPU artifact.
    Assumes each matrix's input dimension is a multiple of `group_size` (true for every supported family).
    """
    _positive_int(params, "params")
    _positive_int(bits, "bits")
    _positive_int(group_size, "group_size")
    if bits == UNQUANTIZED_BITS:
        return FLOAT_BYTES * params
    groups = -(-params // group_size)
    return -(-params * bits // 8) + SCALE_BYTES * groups + -(-groups * bits // 8)


def avg_bits_budget_bytes(avg_bits: float, params_per_expert: int, num_experts: int, group_size: int = 128) -> int:
    """Byte budget equivalent to `avg_bits` per weight: what all experts would take at a uniform (possibly
    fractional) `avg_bits`, zero points included, scales added. Equals the sum of expert_bytes for
    integer `avg_bits`."""
    avg = _fraction(avg_bits, "avg_bits")
    _positive_int(params_per_expert, "params_per_expert")
    _positive_int(num_experts, "num_experts")
    groups = -(-params_per_expert // _positive_int(group_size, "group_size"))
    return math.floor(num_experts * ((params_per_expert + groups) * avg / 8 + SCALE_BYTES * groups))


def _bytes_to_avg_bits(budget: int, params_per_expert: int, num_experts: int, group_size: int) -> float:
    """Smallest avg_bits (4 decimals, rounded up) whose byte budget covers `budget`."""
    groups = -(-params_per_expert // group_size)
    avg = Fraction(8 * (Fraction(budget, num_experts) - SCALE_BYTES * groups), params_per_expert + groups)
    return math.ceil(avg * 10_000) / 10_000


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str | int) -> int:
    """Bytes from a size like "3.5GB" (decimal units), "1.2GiB" (binary units), "800MB" or a plain int."""
    if type(text) is int and text > 0:
        return text
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*", text) if isinstance(text, str) else None
    unit = match and _SIZE_UNITS.get(match.group(2).lower())
    if not match or unit is None:
        raise PlanError(f"size {_show(text)}: expected a number with a unit like 800MB, 3.5GB or 1.2GiB")
    size = round(Fraction(match.group(1)) * unit)
    if size <= 0:
        raise PlanError(f"size {_show(text)}: must be more than 0 bytes")
    return size


def _format_bytes(size: int) -> str:
    return f"{size / 10**9:.3f} GB" if size >= 10**8 else f"{size / 10**6:.3f} MB"


# ---------------------------------------------------------------- objective


def _costs(stats: _Stats, alpha: float, beta: float, gamma: float | None) -> np.ndarray:
    """(moe layers, experts, widths) objective terms f^alpha * w^beta * L^gamma."""
    importance = stats.frequency**alpha * stats.routing_weight**beta
    return importance[..., None] * stats.quant_loss ** (alpha if gamma is None else gamma)


def predicted_loss(stats: Mapping, bits_grid: Sequence[Sequence[int] | None], alpha: float = 1.0,
                   beta: float = 1.5, gamma: float | None = None) -> float:
    """The MC-MoE objective of an allocation, so plans from any scope (or edited by hand) compare on one scale.

    `bits_grid[layer][expert]` as in plan.json; 16 (unquantized) counts as no loss.
    """
    parsed = _parse_stats(stats, "stats")
    _check_exponents(alpha, beta, gamma)
    return _grid_loss(parsed, bits_grid, _costs(parsed, alpha, beta, gamma))


def _grid_loss(stats: _Stats, bits_grid: Sequence, cost: np.ndarray) -> float:
    """Sum of the objective terms of the chosen widths; 16 bits is lossless."""
    total = 0.0
    for row, layer_bits in enumerate(_grid_rows(stats, bits_grid)):
        for e, bits in enumerate(layer_bits):
            if bits == UNQUANTIZED_BITS:
                continue
            if bits not in stats.widths:
                raise PlanError(f"layer {stats.moe_layers[row]} expert {e}: unknown bit width {_show(bits)}: "
                                f"the stats have quant_loss for {_show(list(stats.widths))}")
            total += cost[row, e, stats.widths.index(bits)]
    return float(total)


def _grid_rows(stats: _Stats, bits_grid: Sequence) -> list[Sequence[int]]:
    """The rows of `bits_grid` for the MoE layers, after checking its shape against the stats."""
    if len(bits_grid) != stats.num_layers:
        raise PlanError(f"bits: expected {stats.num_layers} layers, got {len(bits_grid)}")
    rows = []
    for index, layer_bits in enumerate(bits_grid):
        if (layer_bits is None) != (index not in stats.moe_layers):
            expected = "null (no experts in the stats)" if layer_bits is not None else f"{stats.num_experts} widths"
            raise PlanError(f"bits[{index}]: expected {expected}, got {_show(layer_bits)}")
        if layer_bits is not None:
            if len(layer_bits) != stats.num_experts:
                raise PlanError(f"bits[{index}]: expected {stats.num_experts} widths, got {len(layer_bits)}")
            rows.append(layer_bits)
    return rows


def _check_exponents(alpha: float, beta: float, gamma: float | None) -> None:
    for name, value in (("alpha", alpha), ("beta", beta), ("gamma", alpha if gamma is None else gamma)):
        if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
            raise PlanError(f"{name}: expected a finite number >= 0, got {_show(value)}")


# ---------------------------------------------------------------- planning


def make_plan(stats: Mapping, *, avg_bits: float | None = None, size_budget: str | int | None = None,
              bits: Sequence[int] | None = None, scope: str = "global", alpha: float = 1.0, beta: float = 1.5,
              gamma: float | None = None, require_top_widths: bool = True, group_size: int = 128,
              params_per_expert: int | None = None, model: str | os.PathLike | None = None,
              non_expert: Mapping[str, int] | None = None, method: str = "rtn") -> dict:
    """Solve the MC-MoE bit allocation and return a validated moec-plan/1 dict.

    Budget: `avg_bits` (both scopes) or `size_budget` bytes for all routed experts (global scope only;
    non-expert weights are not counted). `bits`: candidate widths, default every width the stats
    measured. alpha=1, beta=1.5 are the released solver's defaults; `gamma` is the exponent on the loss
    (None = alpha, as in the released solver; the paper's Eq. 4 writes a separate gamma).
    `require_top_widths`: in every layer, at least one expert at each of the two highest widths.
    `params_per_expert`: weights per routed expert; default 3*hidden*intermediate from the stats' model
    section or from `model`'s config.json. Required by the global scope.
    `model`: the model this plan is for; a mismatch with the stats' model raises PlanError.
    """
    parsed = _parse_stats(stats, "stats")
    if scope not in SCOPES:
        raise PlanError(f"scope: expected one of {', '.join(SCOPES)}, got {_show(scope)}")
    _check_exponents(alpha, beta, gamma)
    _positive_int(group_size, "group_size")
    widths = _candidate_widths(parsed, bits)
    config = None
    if model is not None:
        config = _read_model_config(model)
        _check_same_model(parsed.model, str(model), config)
    params = _expert_params(parsed.model, config, params_per_expert)
    if (avg_bits is None) == (size_budget is None):
        raise PlanError("give exactly one budget: avg_bits or size_budget")
    if scope == "layer" and size_budget is not None:
        raise PlanError("size_budget needs scope=\"global\"; the paper's per-layer scope takes avg_bits")
    size_bytes = parse_size(size_budget) if size_budget is not None else None
    average = _fraction(avg_bits, "avg_bits") if avg_bits is not None else None

    required = tuple(range(len(widths)))[-2:] if require_top_widths else ()
    if parsed.num_experts < len(required):
        raise PlanError(f"require_top_widths needs {len(required)} experts per layer, the stats have "
                        f"{parsed.num_experts}; turn it off")
    all_costs = _costs(parsed, alpha, beta, gamma)
    cost = all_costs[..., [parsed.widths.index(w) for w in widths]]
    num_moe = len(parsed.moe_layers)
    total_experts = num_moe * parsed.num_experts

    if scope == "layer":
        per_layer = math.floor(average * parsed.num_experts)
        smallest = _smallest_total(list(widths), required, parsed.num_experts, 1)
        if per_layer < smallest:
            raise PlanError(f"avg_bits {avg_bits:g} is infeasible with bits {_widths_text(widths)}"
                            f"{_required_text(widths, required)}: the smallest feasible budget is avg_bits "
                            f"{smallest / parsed.num_experts:g} ({smallest} bits per layer)")
        choice = _solve(cost, list(widths), [(np.array([m]), per_layer) for m in range(num_moe)], required)
        budget = {"avg_bits": float(avg_bits), "bytes": None}
    else:
        if params is None:
            raise PlanError("scope \"global\" needs the expert parameter count: give params_per_expert "
                            "(--params-per-expert), a model folder with config.json, or hidden_size and "
                            "moe_intermediate_size in the stats' model section")
        width_bytes = [expert_bytes(params, w, group_size) for w in widths]
        if size_bytes is not None:
            budget_bytes = size_bytes
        else:
            budget_bytes = avg_bits_budget_bytes(avg_bits, params, total_experts, group_size)
        smallest = _smallest_total(width_bytes, required, parsed.num_experts, num_moe)
        if budget_bytes < smallest:
            asked = f"avg_bits {avg_bits:g}" if avg_bits is not None else f"size budget {_show(size_budget)}"
            raise PlanError(f"{asked} ({budget_bytes} expert bytes) is infeasible with bits {_widths_text(widths)}"
                            f"{_required_text(widths, required)}: the smallest feasible budget is {smallest} bytes "
                            f"({_format_bytes(smallest)}, avg_bits "
                            f"{_bytes_to_avg_bits(smallest, params, total_experts, group_size):g})")
        choice = _solve(cost, width_bytes, [(np.arange(num_moe), budget_bytes)], required)
        budget = {"avg_bits": None if avg_bits is None else float(avg_bits), "bytes": budget_bytes}

    grid: list[list[int] | None] = [None] * parsed.num_layers
    for row, index in enumerate(parsed.moe_layers):
        grid[index] = [widths[j] for j in choice[row]]
    chosen_bytes = None if params is None else sum(
        expert_bytes(params, b, group_size) for layer_bits in grid if layer_bits for b in layer_bits)
    plan = {
        "format": PLAN_FORMAT,
        "model": str(model) if model is not None else parsed.model.get("name_or_path"),
        "experts": {"bits": grid},
        "objective": {
            "scope": scope, "alpha": float(alpha), "beta": float(beta),
            "gamma": None if gamma is None else float(gamma), "candidate_bits": list(widths),
            "require_top_widths": bool(require_top_widths), "budget": budget, "params_per_expert": params,
            "predicted_loss": _grid_loss(parsed, grid, all_costs),
            "predicted_expert_bytes": chosen_bytes,
        },
        "non_expert": _non_expert_widths(non_expert),
        "quantization": {"method": method, "group_size": group_size},
        "pruning": {},
    }
    validate_plan(plan, parsed.num_layers, parsed.num_experts, source="plan")
    return plan


def _candidate_widths(stats: _Stats, bits: Sequence[int] | None) -> tuple[int, ...]:
    if bits is None:
        widths = stats.widths
    else:
        widths = tuple(sorted(set(bits)))
        if not widths:
            raise PlanError("bits: expected at least one bit width")
        for width in widths:
            if width not in stats.widths:
                raise PlanError(f"unknown bit width {_show(width)}: the stats have quant_loss for "
                                f"{_show(list(stats.widths))}")
    for width in widths:
        if width not in PLAN_BIT_WIDTHS:
            raise PlanError(f"bit width {width} cannot be stored in a plan: expected one of "
                            f"{_widths_text(PLAN_BIT_WIDTHS)}")
    return widths


def _smallest_total(width_cost: list[int], required: tuple[int, ...], num_experts: int, num_layers: int) -> int:
    """Least budget any allocation needs: the required widths once per layer, the cheapest width elsewhere."""
    per_layer = sum(width_cost[j] for j in required) + (num_experts - len(required)) * min(width_cost)
    return num_layers * per_layer


def _solve(cost: np.ndarray, width_cost: list[int], budgets: list[tuple[np.ndarray, int]],
           required: tuple[int, ...]) -> np.ndarray:
    """Width index per (moe layer, expert) minimizing `cost`, one binary per (layer, expert, width).

    Each budget row bounds sum(width_cost) over its layers; `required` width indices need one expert
    per layer. The budget rows are rewritten as small integers (each expert takes exactly one width, so
    the cheapest width's cost is a constant) so that HiGHS's tolerances cannot overspend a byte.
    """
    layers, experts, num_widths = cost.shape
    variables = layers * experts * num_widths
    index = np.arange(variables).reshape(layers, experts, num_widths)
    objective = cost - cost.min(axis=2, keepdims=True)  # constant per expert: same argmin, tighter gaps
    if objective.max() > 0:
        objective = objective * (_SOLVER_COST_SCALE / objective.max())

    def rows(groups: list[np.ndarray], coefficients: np.ndarray) -> csr_array:
        data = np.concatenate([np.broadcast_to(coefficients, g.shape).ravel() for g in groups])
        columns = np.concatenate([g.ravel() for g in groups])
        row_ids = np.concatenate([np.full(g.size, r) for r, g in enumerate(groups)])
        return csr_array((data, (row_ids, columns)), shape=(len(groups), variables))

    one_width = rows([index[m, e] for m in range(layers) for e in range(experts)], np.ones(num_widths))
    constraints = [LinearConstraint(one_width, 1, 1)]
    cheapest = min(width_cost)
    steps = [w - cheapest for w in width_cost]
    unit = math.gcd(*steps)
    if unit:
        capacity = [(limit - len(group) * experts * cheapest) // unit for group, limit in budgets]
        constraints.append(LinearConstraint(rows([index[group] for group, _ in budgets],
                                                np.array(steps) // unit), -np.inf, capacity))
    if required:
        protected = rows([index[m, :, j] for m in range(layers) for j in required], np.ones(experts))
        constraints.append(LinearConstraint(protected, 1, np.inf))
    result = milp(objective.ravel(), integrality=np.ones(variables), bounds=Bounds(0, 1),
                  constraints=constraints, options=_SOLVER_OPTIONS)
    if not result.success:
        raise PlanError(f"the MILP solver (HiGHS) found no allocation: {result.message}")
    return result.x.reshape(layers, experts, num_widths).argmax(axis=2)


def _expert_params(stats_model: dict, config: dict | None, params_per_expert: int | None) -> int | None:
    """Weights per routed expert (gate, up, down: 3*hidden*intermediate), from the caller or model metadata."""
    if params_per_expert is not None:
        return _positive_int(params_per_expert, "params_per_expert")
    for source in (stats_model, config or {}):
        hidden = source.get("hidden_size")
        intermediate = source.get("moe_intermediate_size", source.get("intermediate_size"))
        if type(hidden) is int and type(intermediate) is int and hidden > 0 and intermediate > 0:
            return 3 * hidden * intermediate
    return None


def _read_model_config(model: str | os.PathLike) -> dict | None:
    path = Path(model) / "config.json"
    if not path.is_file():
        return None
    config = _read_json(path)
    if not isinstance(config, dict):
        raise PlanError(f"{path}: expected a JSON object")
    return config


def _check_same_model(stats_model: dict, model: str, config: dict | None) -> None:
    """Refuse stats measured on another model: their losses say nothing about this one."""
    if config is not None:
        theirs = {"model_type": config.get("model_type"), "num_layers": config.get("num_hidden_layers"),
                  "num_experts": next((config[k] for k in EXPERT_COUNT_KEYS if k in config), None)}
        for key, value in theirs.items():
            if value is not None and stats_model.get(key) is not None and value != stats_model[key]:
                raise PlanError(f"the stats are for a different model: {_describe(stats_model)}, "
                                f"but {model} is {_describe(theirs)}")
        return
    name = stats_model.get("name_or_path")
    if isinstance(name, str) and _model_name(name) != _model_name(model):
        raise PlanError(f"the stats are for a different model: {name}, but the plan is for {model}")


def _model_name(name_or_path: str) -> str:
    return name_or_path.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1].lower()


def _describe(model: dict) -> str:
    return (f"{model.get('model_type', '?')} with {model.get('num_layers', '?')} layers "
            f"and {model.get('num_experts', '?')} experts")


def _non_expert_widths(overrides: Mapping[str, int] | None) -> dict:
    widths = dict(DEFAULT_NON_EXPERT)
    for key, value in (overrides or {}).items():
        if key not in widths:
            raise PlanError(f"non_expert: unknown part {_show(key)}: expected one of {', '.join(widths)}")
        widths[key] = value
    return widths


# ---------------------------------------------------------------- sweep


def sweep(stats: Mapping, start: float, stop: float, step: float, **plan_options: Any) -> list[dict]:
    """Plan every avg_bits in start, start+step, ..., stop (inclusive) and keep the Pareto front.

    Returns rows {avg_bits, mean_bits, expert_bytes, predicted_loss} sorted by size, each smaller than the
    next and with a higher predicted loss. Size is expert_bytes when known, else mean_bits. `plan_options`
    go to make_plan (scope, bits, alpha, ...).
    """
    first, last, stride = (_fraction(v, name) for v, name in ((start, "start"), (stop, "stop"), (step, "step")))
    if stride <= 0 or last < first:
        raise PlanError(f"sweep {start:g}:{stop:g}:{step:g}: expected start <= stop and step > 0")
    rows = []
    for k in range(math.floor((last - first) / stride) + 1):
        plan = make_plan(stats, avg_bits=float(first + k * stride), **plan_options)
        chosen = [b for layer_bits in plan["experts"]["bits"] if layer_bits for b in layer_bits]
        rows.append({"avg_bits": float(first + k * stride), "mean_bits": sum(chosen) / len(chosen),
                     "expert_bytes": plan["objective"]["predicted_expert_bytes"],
                     "predicted_loss": plan["objective"]["predicted_loss"]})
    rows.sort(key=lambda r: (_row_size(r), r["predicted_loss"]))
    front: list[dict] = []
    for row in rows:
        if not front or row["predicted_loss"] < front[-1]["predicted_loss"]:
            if front and _row_size(row) == _row_size(front[-1]):
                front.pop()
            front.append(row)
    return front


def _row_size(row: dict) -> float:
    return row["expert_bytes"] if row["expert_bytes"] is not None else row["mean_bits"]


def write_sweep_table(rows: Sequence[dict], path: str | os.PathLike) -> None:
    """Write sweep rows as a markdown table (.md) or TSV (anything else)."""
    header = ["avg_bits", "mean_bits", "expert_bytes", "expert_GB", "predicted_loss"]
    lines = []
    for row in rows:
        size = row["expert_bytes"]
        lines.append([f"{row['avg_bits']:g}", f"{row['mean_bits']:.4f}", "" if size is None else str(size),
                      "" if size is None else f"{size / 1e9:.3f}", f"{row['predicted_loss']:.6g}"])
    if Path(path).suffix.lower() == ".md":
        text = "\n".join("| " + " | ".join(cells) + " |" for cells in [header, ["---"] * len(header), *lines])
    else:
        text = "\n".join("\t".join(cells) for cells in [header, *lines])
    write_atomic(Path(path), (text + "\n").encode())


def plot_sweep(rows: Sequence[dict], path: str | os.PathLike) -> None:
    """Plot predicted loss against size as an image (format from the suffix, e.g. .png); needs matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlanError("plotting the sweep needs matplotlib (pip install matplotlib); "
                        "the table was written without it") from None
    by_bytes = all(row["expert_bytes"] is not None for row in rows)
    xs = [row["expert_bytes"] / 1e9 if by_bytes else row["mean_bits"] for row in rows]
    figure = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot(xs, [row["predicted_loss"] for row in rows], marker="o")
    for x, row in zip(xs, rows):
        axes.annotate(f"{row['avg_bits']:g}", (x, row["predicted_loss"]), fontsize=7,
                      textcoords="offset points", xytext=(3, 3))
    axes.set_xlabel("routed-expert size (GB)" if by_bytes else "mean expert bits")
    axes.set_ylabel("predicted loss (MC-MoE objective)")
    axes.set_title("bit allocation Pareto front (labels: avg_bits budget)")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format=Path(path).suffix.lstrip(".").lower() or "png")
    write_atomic(Path(path), buffer.getvalue())


# ---------------------------------------------------------------- plan files


def validate_plan(plan: Any, num_layers: int | None = None, num_experts: int | None = None,
                  source: str = "plan.json") -> None:
    """Raise PlanError naming the first bad field of a moec-plan/1 dict; compiles only start from valid plans."""
    if not isinstance(plan, dict):
        raise PlanError(f"{source}: expected a JSON object, got {_show(plan)}")
    for key in plan:
        if key not in PLAN_KEYS:
            raise PlanError(f"{source}: unknown top-level key {_show(key)} (expected {', '.join(PLAN_KEYS)})")
    for key in PLAN_KEYS:
        if key not in plan and key not in OPTIONAL_PLAN_KEYS:
            raise PlanError(f"{source}: missing field {_show(key)}")
    if plan["format"] != PLAN_FORMAT:
        raise PlanError(f"{source}: format: expected {_show(PLAN_FORMAT)}, got {_show(plan['format'])}")
    if plan["model"] is not None and (not isinstance(plan["model"], str) or not plan["model"]):
        raise PlanError(f"{source}: model: expected a model path or null, got {_show(plan['model'])}")
    _validate_expert_bits(plan["experts"], num_layers, num_experts, source)
    _validate_object(plan["non_expert"], DEFAULT_NON_EXPERT, f"{source}: non_expert")
    for key, width in plan["non_expert"].items():
        _plan_width(width, f"{source}: non_expert.{key}")
    quantization = plan["quantization"]
    _validate_object(quantization, ("method", "group_size"), f"{source}: quantization")
    if quantization["method"] not in QUANT_METHODS:
        raise PlanError(f"{source}: quantization.method: expected one of {', '.join(QUANT_METHODS)}, "
                        f"got {_show(quantization['method'])}")
    group_size = quantization["group_size"]
    if type(group_size) is not int or group_size < 16 or group_size & (group_size - 1):
        raise PlanError(f"{source}: quantization.group_size: expected a power of two >= 16, got {_show(group_size)}")
    _validate_pruning(plan["pruning"], f"{source}: pruning")
    if "objective" in plan:
        _validate_objective(plan["objective"], f"{source}: objective")


def _validate_expert_bits(experts: Any, num_layers: int | None, num_experts: int | None, source: str) -> None:
    _validate_object(experts, ("bits",), f"{source}: experts")
    grid = experts["bits"]
    if not isinstance(grid, list) or not grid:
        raise PlanError(f"{source}: experts.bits: expected a list with one entry per layer, got {_show(grid)}")
    if num_layers is not None and len(grid) != num_layers:
        raise PlanError(f"{source}: experts.bits: expected {num_layers} layers, got {len(grid)}")
    counted_at = ""  # where the expected expert count came from, when the caller gave none
    for layer, row in enumerate(grid):
        where = f"{source}: experts.bits[{layer}]"
        if row is None:
            continue
        if not isinstance(row, list) or not row:
            raise PlanError(f"{where}: expected a list of expert bit widths or null, got {_show(row)}")
        if num_experts is None:
            num_experts, counted_at = len(row), f" (as in experts.bits[{layer}])"
        if len(row) != num_experts:
            raise PlanError(f"{where}: expected {num_experts} experts{counted_at}, got {len(row)}")
        for expert, width in enumerate(row):
            _plan_width(width, f"{where}[{expert}]")
    if num_experts is None:
        raise PlanError(f"{source}: experts.bits: no layer has experts")


def _validate_pruning(pruning: Any, where: str) -> None:
    """`{}`, or {"layers": [{"layer": int, "beta": (0, 1]}, ...], "protect_fraction": [0, 1), and
    optionally "target" and "predicted_pruned_fraction" (see moec.pruning)."""
    if not isinstance(pruning, dict):
        raise PlanError(f"{where}: expected an object, got {_show(pruning)}")
    if not pruning:
        return
    for key in pruning:
        if key not in PRUNING_KEYS:
            raise PlanError(f"{where}: unknown key {_show(key)} (expected {', '.join(PRUNING_KEYS)})")
    for key in PRUNING_KEYS[:2]:
        if key not in pruning:
            raise PlanError(f"{where}: missing field {_show(key)}")
    layers = pruning["layers"]
    if not isinstance(layers, list):
        raise PlanError(f'{where}.layers: expected a list of {{"layer": int, "beta": number}}, got {_show(layers)}')
    seen = set()
    for i, entry in enumerate(layers):
        if not isinstance(entry, dict) or set(entry) != {"layer", "beta"}:
            raise PlanError(f'{where}.layers[{i}]: expected {{"layer": int, "beta": number}}, got {_show(entry)}')
        if type(entry["layer"]) is not int or entry["layer"] < 0 or entry["layer"] in seen:
            raise PlanError(f"{where}.layers[{i}].layer: expected a layer index not listed before, "
                            f"got {_show(entry['layer'])}")
        seen.add(entry["layer"])
        _unit_fraction(entry["beta"], f"{where}.layers[{i}].beta", low_open=True)
    _unit_fraction(pruning["protect_fraction"], f"{where}.protect_fraction", high_open=True)
    for key in PRUNING_KEYS[2:]:
        if key in pruning:
            _unit_fraction(pruning[key], f"{where}.{key}")


def _unit_fraction(value: Any, where: str, low_open: bool = False, high_open: bool = False) -> None:
    ok = type(value) in (int, float) and math.isfinite(value) and \
        (value > 0 if low_open else value >= 0) and (value < 1 if high_open else value <= 1)
    if not ok:
        interval = ("(" if low_open else "[") + "0, 1" + (")" if high_open else "]")
        raise PlanError(f"{where}: expected a number in {interval}, got {_show(value)}")


def _validate_objective(objective: Any, where: str) -> None:
    _validate_object(objective, OBJECTIVE_KEYS, where)
    if objective["scope"] not in SCOPES:
        raise PlanError(f"{where}.scope: expected one of {', '.join(SCOPES)}, got {_show(objective['scope'])}")
    for key in ("alpha", "beta", "gamma", "predicted_loss"):
        if key != "gamma" or objective[key] is not None:
            _statistic(objective[key], f"{where}.{key}")
    candidates = objective["candidate_bits"]
    if not isinstance(candidates, list) or not candidates:
        raise PlanError(f"{where}.candidate_bits: expected a list of bit widths, got {_show(candidates)}")
    for i, width in enumerate(candidates):
        _plan_width(width, f"{where}.candidate_bits[{i}]")
    if type(objective["require_top_widths"]) is not bool:
        raise PlanError(f"{where}.require_top_widths: expected true or false, "
                        f"got {_show(objective['require_top_widths'])}")
    budget = objective["budget"]
    _validate_object(budget, ("avg_bits", "bytes"), f"{where}.budget")
    if budget["avg_bits"] is not None:
        _positive_number(budget["avg_bits"], f"{where}.budget.avg_bits")
    for key, value in (("budget.bytes", budget["bytes"]), ("params_per_expert", objective["params_per_expert"]),
                       ("predicted_expert_bytes", objective["predicted_expert_bytes"])):
        if value is not None:
            _positive_int(value, f"{where}.{key}")


def _validate_object(value: Any, keys: Sequence[str], where: str) -> None:
    if not isinstance(value, dict):
        raise PlanError(f"{where}: expected an object with {', '.join(keys)}, got {_show(value)}")
    for key in value:
        if key not in keys:
            raise PlanError(f"{where}: unknown key {_show(key)} (expected {', '.join(keys)})")
    for key in keys:
        if key not in value:
            raise PlanError(f"{where}: missing field {_show(key)}")


def _plan_width(value: Any, where: str) -> None:
    if type(value) is not int or value not in PLAN_BIT_WIDTHS:
        raise PlanError(f"{where}: expected an int bit width in {_widths_text(PLAN_BIT_WIDTHS)}, got {_show(value)}")


def load_plan(path: str | os.PathLike, num_layers: int | None = None, num_experts: int | None = None) -> dict:
    """Read and validate plan.json."""
    plan = _read_json(Path(path))
    validate_plan(plan, num_layers, num_experts, source=str(path))
    return plan


def save_plan(plan: dict, path: str | os.PathLike) -> None:
    """Validate, then write atomically: a crash leaves either the old file or the new one, never half of one."""
    validate_plan(plan, source=str(path))
    write_atomic(Path(path), (json.dumps(plan, indent=1, allow_nan=False) + "\n").encode())


# ---------------------------------------------------------------- small helpers


def _show(value: Any) -> str:
    """A value as JSON on one short line, for error messages."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _widths_text(widths: Sequence[int]) -> str:
    return "{" + ",".join(str(w) for w in widths) + "}"


def _required_text(widths: Sequence[int], required: tuple[int, ...]) -> str:
    if not required:
        return ""
    return (" and one expert per layer at each of " + " and ".join(f"{widths[j]} bits" for j in reversed(required))
            + " (--no-top-widths drops that requirement)")


def _positive_int(value: Any, where: str) -> int:
    if type(value) is not int or value <= 0:
        raise PlanError(f"{where}: expected a positive int, got {_show(value)}")
    return value


def _positive_number(value: Any, where: str) -> float:
    if type(value) not in (int, float) or not math.isfinite(value) or value <= 0:
        raise PlanError(f"{where}: expected a positive number, got {_show(value)}")
    return value


def _fraction(value: Any, where: str) -> Fraction:
    """An exact decimal reading of a float (2.3 -> 23/10), so budgets like 2.3 * 10 experts stay 23 bits."""
    return Fraction(repr(float(_positive_number(value, where))))
