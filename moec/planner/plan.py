"""moec-plan/1: the plan file a compile reads; validated on every read and write."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from moec.files import write_atomic
from moec.planner.checks import (PlanError, _positive_int, _positive_number, _read_json, _show, _statistic,
                                 _unit_fraction, _validate_object, _widths_text)
from moec.planner.sizes import DROPPED, FLOAT
from moec.quant import GRIDS

PLAN_FORMAT = "moec-plan/1"
# Widths a plan may hold: 1 and 3 are MC-MoE's own, 2/4/8 are onnxruntime's MatMulNBits widths, and
# "float" keeps the weight unquantized (in the artifact's float type).
QUANTIZED_WIDTHS = (1, 2, 3, 4, 8)
PLAN_BIT_WIDTHS = (*QUANTIZED_WIDTHS, FLOAT)
EXPERT_WIDTHS = (DROPPED, *PLAN_BIT_WIDTHS)  # an expert may also be dropped: 0 bits, never routed to
OLD_FLOAT_WIDTH = 16  # how plan files before "float" wrote it
SCOPES = ("global", "layer")
QUANT_METHODS = ("rtn", "gptq")
# each method's default grid, as measured (docs/measurements.md, "Expert quantizers"): the weighted
# grid is GPTQ's best at every width, while RTN's 2-bit experts lost more with it
DEFAULT_GRID = {"rtn": "minmax", "gptq": "weighted"}
# each method's default layer prior (quantization.layer_prior_tokens), as measured (docs/measurements.md,
# "Rarely routed experts"): shrinking each expert's Hessian toward the layer's cut GPTQ's held-out error,
# most on the experts with the fewest tokens; RTN on the weighted grid barely moved
DEFAULT_LAYER_PRIOR = {"rtn": 0, "gptq": 256}
DEFAULT_NON_EXPERT = {"attention": 4, "shared_expert": 4, "dense_mlp": 4, "embedding": 8, "lm_head": 8}
PLAN_KEYS = ("format", "model", "experts", "objective", "non_expert", "quantization", "pruning", "super_experts")
OPTIONAL_PLAN_KEYS = ("objective", "super_experts")
PRUNING_RULES = ("beta", "top_p")  # a pruned layer's rule: MC-MoE's beta x top-1, or top-p
PRUNING_KEYS = ("layers", "protect_fraction", "target", "predicted_pruned_fraction")  # the first two required
# the objective's exponents on frequency, routing weight and loss (the paper's alpha, beta, gamma;
# plan files before these names wrote the Greek letters, whose "beta" read like the pruning threshold)
EXPONENT_KEYS = {"alpha": "frequency_exponent", "beta": "weight_exponent", "gamma": "loss_exponent"}
OBJECTIVE_KEYS = ("scope", *EXPONENT_KEYS.values(), "candidate_bits", "require_top_widths", "budget",
                  "params_per_expert", "predicted_loss", "predicted_expert_bytes", "protect_super_experts",
                  "decode_tok_s", "predicted_decode_tok_s", "per_projection", "whole_budget",
                  "predicted_non_expert_bytes")
OPTIONAL_OBJECTIVE_KEYS = ("protect_super_experts", "decode_tok_s", "predicted_decode_tok_s", "per_projection",
                           "whole_budget", "predicted_non_expert_bytes")



def plan_grid(plan: dict) -> str:
    """The plan's quantization grid (moec.quant.GRIDS); plans from before it have none: minmax."""
    return plan["quantization"].get("grid", "minmax")


def plan_layer_prior(plan: dict) -> int:
    """How many tokens' worth of its layer's statistics (all the layer's calibration tokens) each
    expert's own are shrunk toward; plans from before it have none: 0."""
    return plan["quantization"].get("layer_prior_tokens", 0)

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
    _validate_object(quantization, ("method", "group_size", "grid", "layer_prior_tokens"), f"{source}: quantization",
                     optional=("grid", "layer_prior_tokens"))
    if quantization["method"] not in QUANT_METHODS:
        raise PlanError(f"{source}: quantization.method: expected one of {', '.join(QUANT_METHODS)}, "
                        f"got {_show(quantization['method'])}")
    if plan_grid(plan) not in GRIDS:
        raise PlanError(f"{source}: quantization.grid: expected one of {', '.join(GRIDS)}, "
                        f"got {_show(quantization['grid'])}")
    prior = plan_layer_prior(plan)
    if type(prior) is not int or prior < 0:
        raise PlanError(f"{source}: quantization.layer_prior_tokens: expected a whole number >= 0, got {_show(prior)}")
    group_size = quantization["group_size"]
    if type(group_size) is not int or group_size < 16 or group_size & (group_size - 1):
        raise PlanError(f"{source}: quantization.group_size: expected a power of two >= 16, got {_show(group_size)}")
    _validate_pruning(plan["pruning"], f"{source}: pruning")
    if "super_experts" in plan:
        _validate_super_experts(plan["super_experts"], plan["experts"]["bits"], f"{source}: super_experts")
    if "objective" in plan:
        _validate_objective(plan["objective"], f"{source}: objective")


def _validate_expert_bits(experts: Any, num_layers: int | None, num_experts: int | None, source: str) -> None:
    _validate_object(experts, ("bits", "down_bits"), f"{source}: experts", optional=("down_bits",))
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
            _plan_width(width, f"{where}[{expert}]", EXPERT_WIDTHS)
    if num_experts is None:
        raise PlanError(f"{source}: experts.bits: no layer has experts")
    if "down_bits" in experts:
        _validate_down_bits(experts["down_bits"], grid, source)


def _validate_down_bits(down: Any, grid: list, source: str) -> None:
    """experts.down_bits: each expert's down_proj width, which may differ from its gate/up (bits): the
    same rows as bits; width 0 (dropped) and "float" only where bits has them."""
    if not isinstance(down, list) or len(down) != len(grid):
        raise PlanError(f"{source}: experts.down_bits: expected a list with one entry per layer, as bits, "
                        f"got {_show(down)}")
    for layer, (row, bits) in enumerate(zip(down, grid)):
        where = f"{source}: experts.down_bits[{layer}]"
        if bits is None or row is None:
            if row is not bits:
                raise PlanError(f"{where}: expected {_show(None) if bits is None else f'{len(bits)} widths'}, "
                                f"as experts.bits[{layer}], got {_show(row)}")
            continue
        if not isinstance(row, list) or len(row) != len(bits):
            raise PlanError(f"{where}: expected {len(bits)} widths, as experts.bits[{layer}], got {_show(row)}")
        for expert, (width, whole) in enumerate(zip(row, bits)):
            _plan_width(width, f"{where}[{expert}]", EXPERT_WIDTHS)
            for whole_only, meaning in ((DROPPED, "drops"), (FLOAT, "keeps in float")):
                if (width == whole_only) != (whole == whole_only):
                    raise PlanError(f"{where}[{expert}]: width {_show(whole_only)} {meaning} the whole expert: give "
                                    f"it in both bits and down_bits, got {_show(whole)} and {_show(width)}")


def expert_widths(plan: dict, layer: int, expert: int) -> tuple:
    """(gate and up width, down width) of an expert: experts.bits, and experts.down_bits where given."""
    bits = plan["experts"]["bits"][layer][expert]
    down = plan["experts"].get("down_bits")
    return bits, bits if down is None else down[layer][expert]


def _validate_super_experts(pairs: Any, grid: list, where: str) -> None:
    """[[layer, expert], ...]: experts of sparse layers, none twice (see moec.calibrate)."""
    if not isinstance(pairs, list):
        raise PlanError(f"{where}: expected a list of [layer, expert] pairs, got {_show(pairs)}")
    seen = set()
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, list) and len(pair) == 2 and all(type(n) is int and n >= 0 for n in pair)):
            raise PlanError(f"{where}[{i}]: expected a [layer, expert] pair, got {_show(pair)}")
        layer, expert = pair
        if layer >= len(grid) or grid[layer] is None or expert >= len(grid[layer]):
            raise PlanError(f"{where}[{i}]: {_show(pair)} is not an expert of a MoE layer")
        if tuple(pair) in seen:
            raise PlanError(f"{where}[{i}]: {_show(pair)} is listed twice")
        if grid[layer][expert] == DROPPED:
            raise PlanError(f"{where}[{i}]: {_show(pair)} is a super expert, which experts.bits drops (width 0)")
        seen.add(tuple(pair))


def _validate_pruning(pruning: Any, where: str) -> None:
    """`{}`, or {"layers": [{"layer": int, "beta": (0, 1]} or {"layer": int, "top_p": (0, 1]}, ...],
    "protect_fraction": [0, 1), and optionally "target" and "predicted_pruned_fraction" (see moec.pruning)."""
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
        raise PlanError(f'{where}.layers: expected a list of {{"layer": int, "beta" or "top_p": number}}, '
                        f'got {_show(layers)}')
    seen = set()
    for i, entry in enumerate(layers):
        if not isinstance(entry, dict) or len(entry) != 2 or "layer" not in entry or \
                not any(rule in entry for rule in PRUNING_RULES):
            raise PlanError(f'{where}.layers[{i}]: expected {{"layer": int, "beta": number}} or '
                            f'{{"layer": int, "top_p": number}}, got {_show(entry)}')
        if type(entry["layer"]) is not int or entry["layer"] < 0 or entry["layer"] in seen:
            raise PlanError(f"{where}.layers[{i}].layer: expected a layer index not listed before, "
                            f"got {_show(entry['layer'])}")
        seen.add(entry["layer"])
        rule = next(rule for rule in PRUNING_RULES if rule in entry)
        _unit_fraction(entry[rule], f"{where}.layers[{i}].{rule}", low_open=True)
    _unit_fraction(pruning["protect_fraction"], f"{where}.protect_fraction", high_open=True)
    for key in PRUNING_KEYS[2:]:
        if key in pruning:
            _unit_fraction(pruning[key], f"{where}.{key}")


def _validate_objective(objective: Any, where: str) -> None:
    _validate_object(objective, OBJECTIVE_KEYS, where, optional=OPTIONAL_OBJECTIVE_KEYS)
    for key in ("protect_super_experts", "per_projection", "whole_budget"):
        if type(objective.get(key, False)) is not bool:
            raise PlanError(f"{where}.{key}: expected true or false, got {_show(objective[key])}")
    if objective["scope"] not in SCOPES:
        raise PlanError(f"{where}.scope: expected one of {', '.join(SCOPES)}, got {_show(objective['scope'])}")
    for key in (*EXPONENT_KEYS.values(), "predicted_loss"):
        if key != "loss_exponent" or objective[key] is not None:
            _statistic(objective[key], f"{where}.{key}")
    for key in ("decode_tok_s", "predicted_decode_tok_s"):  # a speed budget, and the profile's prediction
        if objective.get(key) is not None:
            _statistic(objective[key], f"{where}.{key}")
    candidates = objective["candidate_bits"]
    if not isinstance(candidates, list) or not candidates:
        raise PlanError(f"{where}.candidate_bits: expected a list of bit widths, got {_show(candidates)}")
    for i, width in enumerate(candidates):
        _plan_width(width, f"{where}.candidate_bits[{i}]", EXPERT_WIDTHS)
    if type(objective["require_top_widths"]) is not bool:
        raise PlanError(f"{where}.require_top_widths: expected true or false, "
                        f"got {_show(objective['require_top_widths'])}")
    budget = objective["budget"]
    _validate_object(budget, ("avg_bits", "bytes"), f"{where}.budget")
    if budget["avg_bits"] is not None:
        _positive_number(budget["avg_bits"], f"{where}.budget.avg_bits")
    for key, value in (("budget.bytes", budget["bytes"]), ("params_per_expert", objective["params_per_expert"]),
                       ("predicted_expert_bytes", objective["predicted_expert_bytes"]),
                       ("predicted_non_expert_bytes", objective.get("predicted_non_expert_bytes"))):
        if value is not None:
            _positive_int(value, f"{where}.{key}")


def _plan_width(value: Any, where: str, widths: tuple = PLAN_BIT_WIDTHS) -> None:
    quantized = tuple(w for w in widths if w != FLOAT)
    if value != FLOAT and (type(value) is not int or value not in quantized):
        raise PlanError(f"{where}: expected a bit width in {_widths_text(quantized)} or \"float\", "
                        f"got {_show(value)}")


def load_plan(path: str | os.PathLike, num_layers: int | None = None, num_experts: int | None = None) -> dict:
    """Read and validate plan.json (an older file's names read as today's: see _upgrade)."""
    plan = _upgrade(_read_json(Path(path)))
    validate_plan(plan, num_layers, num_experts, source=str(path))
    return plan


def _upgrade(plan: Any) -> Any:
    """A plan file from before the renames: objective exponents under their Greek names, and 16 for
    an unquantized weight, read as today's names."""
    if not isinstance(plan, dict):
        return plan

    def width(value):
        return FLOAT if type(value) is int and value == OLD_FLOAT_WIDTH else value

    experts, non_expert, objective = plan.get("experts"), plan.get("non_expert"), plan.get("objective")
    if isinstance(experts, dict) and isinstance(experts.get("bits"), list):
        experts["bits"] = [[width(b) for b in row] if isinstance(row, list) else row for row in experts["bits"]]
    if isinstance(non_expert, dict):
        plan["non_expert"] = {key: width(value) for key, value in non_expert.items()}
    if isinstance(objective, dict):
        objective = {EXPONENT_KEYS.get(key, key): value for key, value in objective.items()}
        if isinstance(objective.get("candidate_bits"), list):
            objective["candidate_bits"] = [width(b) for b in objective["candidate_bits"]]
        plan["objective"] = objective
    return plan


def save_plan(plan: dict, path: str | os.PathLike) -> None:
    """Validate, then write atomically: a crash leaves either the old file or the new one, never half of one."""
    validate_plan(plan, source=str(path))
    write_atomic(Path(path), (json.dumps(plan, indent=1, allow_nan=False) + "\n").encode())
