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

The MILP is solved by HiGHS through scipy.optimize.milp.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

from moec.planner.checks import PlanError, _fraction, _positive_int, _read_json, _show, _widths_text
from moec.planner.plan import (DEFAULT_GRID, DEFAULT_LAYER_PRIOR, DEFAULT_NON_EXPERT, EXPERT_WIDTHS, PLAN_FORMAT,
                               SCOPES, validate_plan)
from moec.planner.sizes import (DROPPED, FLOAT, _bytes_to_avg_bits, _format_bytes, avg_bits_budget_bytes,
                                expert_bytes, matrix_bytes, parse_size)
from moec.planner.speed import check_profile_budget, check_reachable, expert_seconds, step_seconds
from moec.planner.stats import NonExpertPart, _parse_stats, _Stats

# Hugging Face config keys for the routed-expert count, by family (Mixtral/PhiMoE/gpt-oss, Qwen/OLMoE, DeepSeek).
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
# HiGHS stops at a 1e-4 relative gap by default; the paper's optima differ from runners-up by 2e-6.
_SOLVER_OPTIONS = {"mip_rel_gap": 0.0}
_SOLVER_COST_SCALE = 1e6  # keeps HiGHS's fixed 1e-6 absolute gap negligible whatever the loss units


def _costs(stats: _Stats, alpha: float, beta: float, gamma: float | None) -> np.ndarray:
    """(moe layers, experts, widths) objective terms f^alpha * w^beta * L^gamma."""
    importance = stats.frequency**alpha * stats.routing_weight**beta
    loss = stats.quant_loss ** (alpha if gamma is None else gamma)
    with np.errstate(invalid="ignore"):  # an unrouted expert's barred drop: 0 * inf, barred all the same
        return np.where(np.isinf(loss), np.inf, importance[..., None] * loss)


def predicted_loss(stats: Mapping, bits_grid: Sequence[Sequence[int] | None], alpha: float = 1.0,
                   beta: float = 1.5, gamma: float | None = None) -> float:
    """The MC-MoE objective of an allocation, so plans from any scope (or edited by hand) compare on one scale.

    `bits_grid[layer][expert]` as in plan.json; "float" (unquantized) counts as no loss.
    """
    parsed = _parse_stats(stats, "stats")
    _check_exponents(alpha, beta, gamma)
    return _grid_loss(parsed, bits_grid, _costs(parsed, alpha, beta, gamma))


def _grid_loss(stats: _Stats, bits_grid: Sequence, cost: np.ndarray) -> float:
    """Sum of the objective terms of the chosen widths; "float" is lossless."""
    total = 0.0
    for row, layer_bits in enumerate(_grid_rows(stats, bits_grid)):
        for e, bits in enumerate(layer_bits):
            if bits == FLOAT:
                continue
            if bits not in stats.widths:
                raise PlanError(f"layer {stats.moe_layers[row]} expert {e}: unknown bit width {_show(bits)}: "
                                f"the stats have quant_loss for {_show(list(stats.widths))}")
            term = cost[row, e, stats.widths.index(bits)]
            if np.isinf(term):
                raise PlanError(f"layer {stats.moe_layers[row]} expert {e}: width 0, but the layer picks its "
                                "experts without a top-k (calibrate wrote its width-0 losses as null), so no "
                                "expert of it can be dropped")
            total += term
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


def make_plan(stats: Mapping, *, avg_bits: float | None = None, size_budget: str | int | None = None,
              bits: Sequence[int] | None = None, scope: str = "global", alpha: float | None = None,
              beta: float | None = None,
              gamma: float | None = None, require_top_widths: bool = True, group_size: int = 128,
              params_per_expert: int | None = None, model: str | os.PathLike | None = None,
              non_expert: Mapping[str, int] | None = None, method: str = "rtn", grid: str | None = None,
              layer_prior_tokens: int | None = None, target: str | None = None,
              protect_super_experts: bool = True, profile: Mapping | None = None,
              decode_tok_s: float | None = None, per_projection: bool = False, whole_budget: bool = False) -> dict:
    """Solve the MC-MoE bit allocation and return a validated moec-plan/1 dict.

    Budget: `avg_bits` (both scopes) or `size_budget` bytes for all routed experts (global scope only;
    non-expert weights are not counted, but with `whole_budget`). `bits`: candidate widths, default every
    width the stats measured. alpha=1, beta=1.5 are the released solver's defaults (None); `gamma` is the
    exponent on the loss (None = alpha, as in the released solver; the paper's Eq. 4 writes a separate gamma).
    `require_top_widths`: in every layer, at least one expert at each of the two highest widths.
    `params_per_expert`: weights per routed expert; default 3*hidden*intermediate from the stats' model
    section or from `model`'s config.json. Required by the global scope.
    `model`: the model this plan is for; a mismatch with the stats' model raises PlanError.
    `target`: a compile target whose storage the byte budget and the predicted size count (containers,
    scale type); None packs every width as planned with float32 scales (MC-MoE's accounting).
    Width 0 among `bits` (never by default) drops an expert (no bytes, never routed to; its loss is calibrate's, with
    the tokens routed anew): a layer keeps at least the stats' top-k experts.
    `protect_super_experts`: the stats' super experts take the highest candidate width, and the
    plan lists them, so that dynamic pruning never drops them either.
    `profile`: the host's decode costs (moec-profile/1, `moec profile`); with it the plan predicts its
    decode speed, and `decode_tok_s` bounds it (moec.planner.speed): alone, or beside a byte budget.
    `method`, `grid` and `layer_prior_tokens`: how compile quantizes (plan.json's `quantization`); None
    is the method's DEFAULT_GRID or DEFAULT_LAYER_PRIOR.
    `per_projection`: an expert's down_proj may take another width than its gate and up
    (experts.down_bits); a split expert's loss is the root sum of squares of the stats' projection_loss
    of its parts (global scope; dropped, super and top-width experts stay whole).
    `whole_budget`: the byte budget also pays for the weights outside the routed experts that the stats
    measured (`moec calibrate --non-expert`: attention, shared experts, dense MLPs, the embedding), and the
    solver picks each such category's width among `bits` too (the head, and categories the stats did not
    measure, keep their `non_expert` width within the budget). `avg_bits` then means the bytes of the
    experts at that average plus the other weights at their `non_expert` widths: the same file size as
    the plan without it. Every weight is weighed on one scale, the squared error it adds to the residual
    stream relative to the stream's norm there (exponents alpha 0, beta 0, gamma 2, the defaults with it).
    """
    parsed = _parse_stats(stats, "stats")
    if scope not in SCOPES:
        raise PlanError(f"scope: expected one of {', '.join(SCOPES)}, got {_show(scope)}")
    alpha, beta, gamma = _exponents(alpha, beta, gamma, whole_budget)
    _check_exponents(alpha, beta, gamma)
    _positive_int(group_size, "group_size")
    widths = _candidate_widths(parsed, bits)
    config = None
    if model is not None:
        config = _read_model_config(model)
        _check_same_model(parsed.model, str(model), config)
    params = _expert_params(parsed.model, config, params_per_expert)
    check_profile_budget(decode_tok_s, profile)
    if avg_bits is not None and size_budget is not None:
        raise PlanError("give exactly one budget of bytes: avg_bits or size_budget")
    if avg_bits is None and size_budget is None and decode_tok_s is None:
        raise PlanError("give exactly one budget of bytes (avg_bits or size_budget), or a decode budget "
                        "(decode_tok_s)")
    if scope == "layer" and avg_bits is None and size_budget is None:
        raise PlanError("scope \"layer\" takes the paper's per-layer avg_bits budget")
    if whole_budget:
        if scope == "layer":
            raise PlanError("whole_budget needs scope \"global\": the paper's per-layer budget counts experts alone")
        if not any(part.quant_loss for part in parsed.non_expert.values()) or parsed.residual_norm is None:
            raise PlanError("whole_budget needs the stats' non_expert losses and residual norms, which moec calibrate "
                            "--non-expert records")
        # every error relative to the residual stream where it lands
        scale = 1 / parsed.residual_norm
        parsed = dataclasses.replace(parsed, quant_loss=parsed.quant_loss * scale[:, None, None],
                                     projection_loss=None if parsed.projection_loss is None else
                                     parsed.projection_loss * scale[:, None, None, None])
    if scope == "layer" and size_budget is not None:
        raise PlanError("size_budget needs scope=\"global\"; the paper's per-layer scope takes avg_bits")
    size_bytes = parse_size(size_budget) if size_budget is not None else None
    average = _fraction(avg_bits, "avg_bits") if avg_bits is not None else None

    quantized = [j for j, width in enumerate(widths) if width != DROPPED]
    if not quantized:
        raise PlanError("bits: width 0 alone would drop every expert; give at least one width to keep them at")
    required = tuple(quantized[-2:]) if require_top_widths else ()
    supers = [tuple(pair) for pair in stats.get("super_experts", [])] if protect_super_experts else []
    fixed = {(parsed.moe_layers.index(layer), e): len(widths) - 1 for layer, e in supers}
    keep_at_least = None
    if DROPPED in widths:
        keep_at_least = parsed.model.get("top_k")
        if type(keep_at_least) is not int:
            raise PlanError("bit width 0 (dropping experts) needs the stats' model.top_k, which moec calibrate "
                            "records: run it again")
    if parsed.num_experts < len(required):
        raise PlanError(f"require_top_widths needs {len(required)} experts per layer, the stats have "
                        f"{parsed.num_experts}; turn it off")
    options = [(w, w) for w in widths]  # (gate and up width, down width); whole experts first, as widths
    if per_projection:
        if scope == "layer":
            raise PlanError("per_projection needs scope \"global\": the paper's per-layer budget counts whole experts")
        if parsed.projection_loss is None:
            raise PlanError("per_projection needs each expert's projection_loss, which moec calibrate records: "
                            "calibrate again")
        options += [(a, b) for a in widths for b in widths if a != b and DROPPED not in (a, b)]
    cost = _option_costs(parsed, alpha, beta, gamma, options)
    down_share = 1 / len(parsed.model.get("expert_projections", ("gate", "up", "down")))
    num_moe = len(parsed.moe_layers)
    total_experts = num_moe * parsed.num_experts
    seconds, other = expert_seconds(profile, parsed, widths) if profile is not None else (None, 0.0)
    if seconds is not None and per_projection:  # a split expert's time, its parts' shares of the whole's
        whole = seconds
        seconds = np.stack([(1 - down_share) * whole[..., widths.index(a)] + down_share * whole[..., widths.index(b)]
                            for a, b in options], axis=-1)
    time_budget = (seconds, check_reachable(seconds, other, decode_tok_s)) if decode_tok_s is not None else None
    non_widths = _non_expert_widths(non_expert)
    part_loss, part_bytes = 0.0, 0  # with whole_budget: the non-expert categories' objective terms and bytes

    if scope == "layer":
        per_layer = math.floor(average * parsed.num_experts)
        smallest = max(_smallest_totals(list(widths), required, parsed, fixed, keep_at_least))
        if per_layer < smallest:
            raise PlanError(f"avg_bits {avg_bits:g} is infeasible with bits {_widths_text(widths)}"
                            f"{_required_text(widths, required, fixed)}: the smallest feasible budget is avg_bits "
                            f"{smallest / parsed.num_experts:g} ({smallest} bits per layer)")
        choice, _ = _solve(cost, list(widths), [(np.array([m]), per_layer) for m in range(num_moe)], required, fixed,
                           keep_at_least, time_budget)
        budget = {"avg_bits": float(avg_bits), "bytes": None}
    else:
        if params is None:
            raise PlanError("scope \"global\" needs the expert parameter count: give params_per_expert "
                            "(--params-per-expert), a model folder with config.json, or hidden_size and "
                            "moe_intermediate_size in the stats' model section")
        width_bytes = [_option_bytes(params, option, down_share, group_size, target) for option in options]
        parts = _non_expert_options(parsed, widths, non_widths, gamma, group_size, target) if whole_budget else {}
        if size_bytes is not None:
            budget_bytes = size_bytes
        elif avg_bits is not None:
            budget_bytes = avg_bits_budget_bytes(avg_bits, params, total_experts, group_size, target) + sum(
                _part_bytes(parsed.non_expert[category], non_widths[category], group_size, target)
                for category in parts)
        else:  # a decode budget alone
            budget_bytes = max(width_bytes) * total_experts + sum(max(bytes_) for _, _, bytes_ in parts.values())
        smallest = sum(_smallest_totals(width_bytes, required, parsed, fixed, keep_at_least)) + \
            sum(min(bytes_) for _, _, bytes_ in parts.values())
        if budget_bytes < smallest:
            asked = f"avg_bits {avg_bits:g}" if avg_bits is not None else f"size budget {_show(size_budget)}"
            counted = "bytes" if whole_budget else "expert bytes"
            raise PlanError(f"{asked} ({budget_bytes} {counted}) is infeasible with bits {_widths_text(widths)}"
                            f"{_required_text(widths, required, fixed)}: the smallest feasible budget is "
                            f"{smallest} bytes "
                            f"({_format_bytes(smallest)}, avg_bits "
                            f"{_bytes_to_avg_bits(smallest, params, total_experts, group_size, target):g})")
        choice, part_choice = _solve(cost, width_bytes, [(np.arange(num_moe), budget_bytes)], required,
                                     fixed, keep_at_least, time_budget,
                                     [(costs, bytes_) for _, costs, bytes_ in parts.values()])
        budget = {"avg_bits": None if avg_bits is None else float(avg_bits),
                  "bytes": None if avg_bits is None and size_bytes is None else budget_bytes}
        for (category, (part_widths, costs, bytes_)), j in zip(parts.items(), part_choice):
            non_widths[category] = part_widths[j]
            part_loss += costs[j]
            part_bytes += bytes_[j]

    bits_grid: list[list[int] | None] = [None] * parsed.num_layers
    down_grid: list[list[int] | None] = [None] * parsed.num_layers
    for row, index in enumerate(parsed.moe_layers):
        bits_grid[index] = [options[j][0] for j in choice[row]]
        down_grid[index] = [options[j][1] for j in choice[row]]
    chosen_bytes = None if params is None else sum(
        _option_bytes(params, options[j], down_share, group_size, target) for j in choice.ravel())
    plan = {
        "format": PLAN_FORMAT,
        "model": str(model) if model is not None else parsed.model.get("name_or_path"),
        "experts": {"bits": bits_grid, **({"down_bits": down_grid} if per_projection else {})},
        "objective": {
            "scope": scope, "frequency_exponent": float(alpha), "weight_exponent": float(beta),
            "loss_exponent": None if gamma is None else float(gamma), "candidate_bits": list(widths),
            "require_top_widths": bool(require_top_widths), "budget": budget, "params_per_expert": params,
            "predicted_loss": float(np.take_along_axis(cost, choice[..., None], axis=2).sum() + part_loss),
            "predicted_expert_bytes": chosen_bytes, "protect_super_experts": bool(protect_super_experts),
            "decode_tok_s": None if decode_tok_s is None else float(decode_tok_s),
            "predicted_decode_tok_s": None if seconds is None else 1 / step_seconds(seconds, other, choice),
            "per_projection": bool(per_projection),
            **({"whole_budget": True, "predicted_non_expert_bytes": int(part_bytes)} if whole_budget else {}),
        },
        "non_expert": non_widths,
        "quantization": {"method": method, "group_size": group_size,
                         "grid": grid or DEFAULT_GRID.get(method, "minmax"),
                         "layer_prior_tokens": DEFAULT_LAYER_PRIOR.get(method, 0) if layer_prior_tokens is None
                         else layer_prior_tokens},
        "pruning": {},
        "super_experts": [list(pair) for pair in supers],
    }
    validate_plan(plan, parsed.num_layers, parsed.num_experts, source="plan")
    return plan


def _option_costs(stats: _Stats, alpha: float, beta: float, gamma: float | None, options: list[tuple]) -> np.ndarray:
    """(moe layers, experts, options) objective terms: a whole expert's from its quant_loss, a split
    one's from the root sum of squares of its parts' projection_loss, which is how the parts' errors
    add (on a trained Mixtral-shaped model it gave whole experts' quant_loss within 3%, 1.00 on
    average)."""
    width = stats.widths.index
    whole = _costs(stats, alpha, beta, gamma)
    importance = stats.frequency**alpha * stats.routing_weight**beta
    split = stats.projection_loss
    return np.stack([whole[..., width(a)] if a == b else importance * np.hypot(
        split[:, :, 0, width(a)], split[:, :, 1, width(b)]) ** (alpha if gamma is None else gamma)
        for a, b in options], axis=-1)


def _option_bytes(params: int, option: tuple, down_share: float, group_size: int, target: str | None) -> int:
    """Stored bytes of an expert at (gate and up width, down width): down_proj is `down_share` of its weights."""
    whole, down = option
    if whole == down:
        return expert_bytes(params, whole, group_size, target)
    down_params = round(params * down_share)
    return expert_bytes(params - down_params, whole, group_size, target) + \
        expert_bytes(down_params, down, group_size, target)


def _candidate_widths(stats: _Stats, bits: Sequence[int] | None) -> tuple[int, ...]:
    if bits is None:  # dropping (width 0) only when asked: on the sample it cost more than it saved
        widths = tuple(w for w in stats.widths if w != DROPPED)
    else:
        widths = tuple(sorted(set(bits)))
        if not widths:
            raise PlanError("bits: expected at least one bit width")
        for width in widths:
            if width not in stats.widths:
                raise PlanError(f"unknown bit width {_show(width)}: the stats have quant_loss for "
                                f"{_show(list(stats.widths))}")
    for width in widths:
        if width not in EXPERT_WIDTHS:
            raise PlanError(f"bit width {width} cannot be stored in a plan: expected one of "
                            f"{_widths_text(EXPERT_WIDTHS)}")
    return widths


def _smallest_totals(width_cost: list[int], required: tuple[int, ...], stats: _Stats, fixed: dict,
                     keep_at_least: int | None) -> list[int]:
    """Least budget each layer needs: its fixed experts at their widths, the required widths not
    among them once, the cheapest width elsewhere (but no more experts dropped than
    `keep_at_least` allows, none in a layer that cannot drop any; width 0 is then the first and
    cheapest)."""
    totals = []
    for m in range(len(stats.moe_layers)):
        pinned = [j for (layer, _), j in fixed.items() if layer == m]
        needed = [j for j in required if j not in pinned]
        free = stats.num_experts - len(pinned) - len(needed)
        total = sum(width_cost[j] for j in pinned + needed) + free * min(width_cost)
        if keep_at_least is not None:
            keep = stats.num_experts if np.isinf(stats.quant_loss[m]).any() else keep_at_least
            total += max(0, keep - len(pinned) - len(needed)) * (min(width_cost[1:]) - width_cost[0])
        totals.append(total)
    return totals


def _solve(cost: np.ndarray, width_cost: list[int], budgets: list[tuple[np.ndarray, int]],
           required: tuple[int, ...], fixed: dict | None = None, keep_at_least: int | None = None,
           time_budget: tuple[np.ndarray, float] | None = None,
           parts: Sequence[tuple[np.ndarray, list[int]]] = ()) -> tuple[np.ndarray, list[int]]:
    """Width index per (moe layer, expert) minimizing `cost`, one binary per (layer, expert, width).

    Each budget row bounds sum(width_cost) over its layers; `required` width indices need one expert
    per layer; an infinite cost bars its width; `fixed` {(moe layer, expert): width index} are set;
    with `keep_at_least`, at most experts - keep_at_least experts per layer take width 0 (the first
    width); `time_budget` (seconds
    per (layer, expert, width), limit) bounds the experts' share of a decode step. `parts` (objective
    terms, bytes) are further units that each take one of their options, paid from the one budget row
    (whole_budget); their chosen option indices come back beside the experts' widths. The budget rows
    are rewritten as small integers (each unit takes exactly one option, so its cheapest option's cost
    is a constant) so that HiGHS's tolerances cannot overspend a byte.
    """
    layers, experts, num_widths = cost.shape
    assert not parts or len(budgets) == 1, "parts share the one budget of the global scope"
    expert_variables = layers * experts * num_widths
    starts = np.cumsum([expert_variables] + [len(part_cost) for part_cost, _ in parts])
    variables = int(starts[-1])
    index = np.arange(expert_variables).reshape(layers, experts, num_widths)
    part_index = [np.arange(start - len(part_cost), start) for start, (part_cost, _) in zip(starts[1:], parts)]
    barred = np.isinf(cost)  # dropping an expert of a layer that picks its experts without a top-k
    # less a constant per unit: the same argmin, tighter gaps
    objective = np.concatenate([
        np.where(barred, 0.0, cost - np.where(barred, np.inf, cost).min(axis=2, keepdims=True)).ravel(),
        *(part_cost - part_cost.min() for part_cost, _ in parts)])
    if objective.max() > 0:
        objective = objective * (_SOLVER_COST_SCALE / objective.max())

    def rows(groups: list[np.ndarray], coefficients: list[np.ndarray]) -> csr_array:
        data = np.concatenate([np.broadcast_to(c, g.shape).ravel() for g, c in zip(groups, coefficients)])
        columns = np.concatenate([g.ravel() for g in groups])
        row_ids = np.concatenate([np.full(g.size, r) for r, g in enumerate(groups)])
        return csr_array((data, (row_ids, columns)), shape=(len(groups), variables))

    units = [index[m, e] for m in range(layers) for e in range(experts)] + part_index
    constraints = [LinearConstraint(rows(units, [np.ones(len(u)) for u in units]), 1, 1)]
    cheapest = min(width_cost)
    steps = [w - cheapest for w in width_cost]
    part_steps = [np.array(bytes_) - min(bytes_) for _, bytes_ in parts]
    unit = math.gcd(*steps, *(int(step) for part in part_steps for step in part))
    if unit:
        capacity = [(limit - len(group) * experts * cheapest - sum(min(bytes_) for _, bytes_ in parts)) // unit
                    for group, limit in budgets]
        budget_rows = rows([index[group] for group, _ in budgets], [np.array(steps) // unit] * len(budgets))
        if parts:  # one budget row: the parts' columns join it
            budget_rows = budget_rows + rows([np.concatenate(part_index)],
                                             [np.concatenate(part_steps) // unit])
        constraints.append(LinearConstraint(budget_rows, -np.inf, capacity))
    if required:
        protected = rows([index[m, :, j] for m in range(layers) for j in required], [np.ones(experts)] * (
            layers * len(required)))
        constraints.append(LinearConstraint(protected, 1, np.inf))
    if keep_at_least is not None:
        dropped = rows([index[m, :, 0] for m in range(layers)], [np.ones(experts)] * layers)
        constraints.append(LinearConstraint(dropped, 0, experts - keep_at_least))
    if time_budget is not None:
        seconds, limit = time_budget  # in microseconds: HiGHS's 1e-6 feasibility tolerance is then a picosecond
        per_variable = np.zeros((1, variables))
        per_variable[0, :expert_variables] = seconds.ravel() * 1e6
        constraints.append(LinearConstraint(csr_array(per_variable), -np.inf, limit * 1e6))
    lower = np.zeros(variables)
    for (m, e), j in (fixed or {}).items():
        lower[index[m, e, j]] = 1
    upper = np.concatenate([np.where(barred, 0, 1).ravel(), np.ones(variables - expert_variables)])
    result = milp(objective, integrality=np.ones(variables), bounds=Bounds(lower, upper),
                  constraints=constraints, options=_SOLVER_OPTIONS)
    if not result.success:
        if time_budget is not None:
            raise PlanError("no allocation meets the decode budget together with the other constraints (the byte "
                            "budget, a width a layer at each of the two highest (--no-top-widths), super experts at "
                            f"the highest (--no-protect-super-experts)): {result.message}")
        raise PlanError(f"the MILP solver (HiGHS) found no allocation: {result.message}")
    return (result.x[:expert_variables].reshape(layers, experts, num_widths).argmax(axis=2),
            [int(result.x[columns].argmax()) for columns in part_index])


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


def _exponents(alpha: float | None, beta: float | None, gamma: float | None,
               whole_budget: bool) -> tuple[float, float, float | None]:
    """(alpha, beta, gamma): MC-MoE's released defaults (1, 1.5, alpha), or with `whole_budget` the one
    scale it weighs every weight by (0, 0, 2: the squared output error)."""
    if not whole_budget:
        return 1.0 if alpha is None else alpha, 1.5 if beta is None else beta, gamma
    given = (alpha, beta, gamma)
    if given != (None, None, None) and given != (0, 0, 2):
        raise PlanError("whole_budget weighs every weight by the squared error it adds to the residual stream: "
                        "exponents alpha 0, beta 0, gamma 2 (its defaults), not "
                        f"{', '.join(_show(v) for v in given)}")
    return 0.0, 0.0, 2.0


def _non_expert_options(stats: _Stats, widths: Sequence[int], given: dict, gamma: float, group_size: int,
                        target: str | None) -> dict:
    """{category: (widths, objective terms, bytes)} for whole_budget: a measured category may take each
    quantized candidate width the stats measured it at, its term the sum over its layers of loss^gamma;
    one the stats count but did not measure (the head) keeps its `given` width, as one option."""
    options = {}
    for category, part in stats.non_expert.items():
        if part.quant_loss is None:
            part_widths = [given[category]]
            costs = [0.0]
        else:
            part_widths = [w for w in widths if w != DROPPED and w in part.quant_loss]
            if not part_widths:
                raise PlanError(f"non_expert.{category}: the stats measured widths {_show(list(part.quant_loss))}, "
                                f"none of the candidate widths {_widths_text(widths)}")
            costs = [float(np.sum((part.quant_loss[w] / part.residual_norm) ** gamma)) for w in part_widths]
        options[category] = (part_widths, np.array(costs),
                             [_part_bytes(part, w, group_size, target) for w in part_widths])
    return options


def _part_bytes(part: NonExpertPart, bits: int, group_size: int, target: str | None) -> int:
    """Stored bytes of a non-expert category's matrices at `bits`."""
    return sum(n * matrix_bytes(rows, columns, bits, group_size, target) for rows, columns, n in part.matrices)


def _non_expert_widths(overrides: Mapping[str, int] | None) -> dict:
    widths = dict(DEFAULT_NON_EXPERT)
    for key, value in (overrides or {}).items():
        if key not in widths:
            raise PlanError(f"non_expert: unknown part {_show(key)}: expected one of {', '.join(widths)}")
        widths[key] = value
    return widths


def _required_text(widths: Sequence[int], required: tuple[int, ...], fixed: dict | None = None) -> str:
    text = "" if not required else (" and one expert per layer at each of " +
                                    " and ".join(f"{widths[j]} bits" for j in reversed(required)) +
                                    " (--no-top-widths drops that requirement)")
    if fixed:
        text += (f" and the {len(fixed)} super experts at {widths[-1]} bits (--no-protect-super-experts "
                 "drops that)")
    return text
