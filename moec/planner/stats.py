"""moec-stats/1: what `moec calibrate` measured, validated and read as arrays for the solver."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moec.planner.checks import (PlanError, _positive_int, _positive_number, _read_json, _show, _statistic,
                                 _width_key)
from moec.planner.plan import DEFAULT_NON_EXPERT

STATS_FORMAT = "moec-stats/1"
PROJECTION_PARTS = ("gate_up", "down")  # an expert's parts a plan may give widths of their own


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
    quant_loss: np.ndarray  # (moe layers, experts, widths); inf: a width 0 the layer cannot take
    # (moe layers, experts, 2, widths): gate and up alone, down alone (width 0, the expert dropped, is
    # its quant_loss on gate_up); None for stats from before calibrate measured it
    projection_loss: np.ndarray | None = None
    # `moec calibrate --non-expert`'s parts: category -> NonExpertPart; empty for stats without them
    non_expert: dict = field(default_factory=dict)
    # (moe layers,): the norm of each layer's output, where its experts' errors land (--non-expert); or None
    residual_norm: np.ndarray | None = None


@dataclass(frozen=True)
class NonExpertPart:
    """A plan category's weights outside the routed experts (moec.policy): their matrices, and where
    calibrate measured them, the loss of quantizing them (width -> one loss per layer holding them)."""

    matrices: tuple[tuple[int, int, int], ...]  # (rows, columns, how many)
    quant_loss: dict[int, np.ndarray] | None
    residual_norm: np.ndarray | None = None  # beside each per-layer loss: the residual stream's norm there


def load_stats(path: str | os.PathLike) -> dict:
    """Read and validate a moec-stats/1 file, so bad statistics fail here rather than inside the solver."""
    stats = _read_json(Path(path))
    _parse_stats(stats, str(path))
    return stats


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
    residual_of: dict[int, Any] = {}  # layer -> its output's norm (calibrate --non-expert), or None
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
        residual_of[index] = entry.get("residual_norm")
    if not by_index:
        raise PlanError(f"{source}: layers: no layer has experts")

    moe_layers = tuple(sorted(by_index))
    widths: tuple[int, ...] | None = None
    frequency = np.empty((len(moe_layers), num_experts))
    routing_weight = np.empty_like(frequency)
    losses: list[list[list[float]]] = []
    split: list[list] = []  # per-projection losses, where every expert has them
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
            # a null width-0 loss: the layer cannot drop the expert (calibrate found no top-k to mask)
            layer_losses.append([np.inf if w == 0 and table[str(w)] is None else
                                 _statistic(table[str(w)], f"{where}.quant_loss[\"{w}\"]") for w in widths])
            split.append(_projection_losses(expert.get("projection_loss"), widths, layer_losses[-1], where))
        losses.append(layer_losses)
        for name, values in (("frequency", frequency), ("routing_weight", routing_weight)):
            total = values[row].sum()
            if total <= 0:
                raise PlanError(f"{source}: layer {index}: every expert has {name} 0, so experts cannot be weighed")
            values[row] /= total
    assert widths is not None
    supers = stats.get("super_experts", [])
    if not isinstance(supers, list) or not all(
            isinstance(pair, list) and len(pair) == 2 and pair[0] in by_index and type(pair[1]) is int
            and 0 <= pair[1] < num_experts for pair in supers):
        raise PlanError(f"{source}: super_experts: expected [layer, expert] pairs of the MoE layers' experts, "
                        f"got {_show(supers)}")
    if any(row is None for row in split) and not all(row is None for row in split):
        raise PlanError(f"{source}: projection_loss: some experts have it and others not: calibrate again")
    projection_loss = None if split[0] is None else \
        np.array(split).reshape(len(moe_layers), num_experts, 2, len(widths))
    residual = None
    if any(residual_of[index] is not None for index in moe_layers):
        residual = np.array([_positive_number(residual_of[index], f"{source}: layers[{by_index[index][0]}]"
                                              ".residual_norm") for index in moe_layers])
    return _Stats(model, num_layers, num_experts, moe_layers, widths, frequency, routing_weight, np.array(losses),
                  projection_loss, _non_expert_parts(stats.get("non_expert", {}), f"{source}: non_expert"), residual)


def _non_expert_parts(table: Any, where: str) -> dict:
    if not isinstance(table, dict):
        raise PlanError(f"{where}: expected an object of category -> {{params, quant_loss}}, got {_show(table)}")
    parts = {}
    for category, part in table.items():
        here = f"{where}.{category}"
        if category not in DEFAULT_NON_EXPERT:
            raise PlanError(f"{where}: unknown category {_show(category)} (expected {', '.join(DEFAULT_NON_EXPERT)})")
        if not isinstance(part, dict) or set(part) - {"params", "matrices", "quant_loss", "residual_norm"}:
            raise PlanError(f"{here}: expected an object with params, matrices and optionally quant_loss, "
                            f"got {_show(part)}")
        params = _positive_int(part.get("params"), f"{here}.params")
        matrices = part.get("matrices")
        if not isinstance(matrices, list) or not matrices or not all(
                isinstance(m, list) and len(m) == 3 and all(type(v) is int and v > 0 for v in m) for m in matrices):
            raise PlanError(f"{here}.matrices: expected a list of [rows, columns, how many] positive ints, "
                            f"got {_show(matrices)}")
        if sum(rows * columns * n for rows, columns, n in matrices) != params:
            raise PlanError(f"{here}: params {params} is not the weights its matrices hold")
        losses = part.get("quant_loss")
        if losses is not None:
            if not isinstance(losses, dict) or not losses:
                raise PlanError(f"{here}.quant_loss: expected an object of bit width -> losses, got {_show(losses)}")
            losses = {_width_key(key, f"{here}.quant_loss"): value for key, value in losses.items()}
            counts = {len(value) if isinstance(value, list) else -1 for value in losses.values()}
            if len(counts) != 1 or counts == {-1} or counts == {0}:
                raise PlanError(f"{here}.quant_loss: expected the same non-empty list of per-layer losses for "
                                f"each width, got {_show(part['quant_loss'])}")
            losses = {width: np.array([_statistic(v, f"{here}.quant_loss[\"{width}\"]") for v in value])
                      for width, value in sorted(losses.items())}
            residual = part.get("residual_norm")
            if not isinstance(residual, list) or len(residual) != counts.pop():
                raise PlanError(f"{here}.residual_norm: expected one norm per layer of quant_loss, "
                                f"got {_show(residual)}")
            residual = np.array([_positive_number(v, f"{here}.residual_norm") for v in residual])
        parts[category] = NonExpertPart(tuple(map(tuple, matrices)), losses,
                                        residual if losses is not None else None)
    return parts


def _projection_losses(table: Any, widths: tuple[int, ...], quant_loss: list[float], where: str) -> list | None:
    """An expert's [[gate_up loss per width], [down loss per width]], or None where it has none; width 0
    drops the whole expert, counted as gate_up's."""
    if table is None:
        return None
    where += ".projection_loss"
    if not isinstance(table, dict) or sorted(table) != sorted(PROJECTION_PARTS):
        raise PlanError(f"{where}: expected an object with {' and '.join(PROJECTION_PARTS)}, got {_show(table)}")
    rows = []
    for part in PROJECTION_PARTS:
        losses = table[part]
        quantized = [w for w in widths if w]
        if not isinstance(losses, dict) or sorted(_width_key(k, f"{where}.{part}") for k in losses) != quantized:
            raise PlanError(f"{where}.{part}: expected a loss for each of the widths {_show(quantized)}, "
                            f"got {_show(losses)}")
        rows.append([_statistic(losses[str(w)], f"{where}.{part}[\"{w}\"]") if w else
                     (quant_loss[j] if part == "gate_up" else 0.0) for j, w in enumerate(widths)])
    return rows
