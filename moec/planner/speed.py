"""moec-profile/1: what a decode step costs on a host (`moec profile`), as the planner's speed model.

A plan's decode step is predicted as the profile's other seconds (attention, norms, router, head)
plus, in every MoE layer, top-k routed experts, each expert e taking its share f_e of them (its
calibrated routing frequency, normalized per layer) at the profiled seconds of its width:

    step = other + sum_layers top_k * sum_e f_e * t_layer(b_e)

linear in the solver's (layer, expert, width) choices, so a decode-speed budget is one more row of
the integer program.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from moec.planner.checks import PlanError, _positive_number, _read_json, _show
from moec.planner.sizes import DROPPED
from moec.planner.stats import _Stats

PROFILE_FORMAT = "moec-profile/1"


def load_profile(path: str | os.PathLike) -> dict:
    """Read a moec-profile/1 file; its fit to the stats is checked when a plan uses it."""
    profile = _read_json(Path(path))
    if not isinstance(profile, dict) or profile.get("format") != PROFILE_FORMAT:
        raise PlanError(f"{path}: expected a {PROFILE_FORMAT} file (moec profile), got "
                        f"{_show(profile.get('format') if isinstance(profile, dict) else profile)}")
    return profile


def expert_seconds(profile: dict, stats: _Stats, widths: Sequence) -> tuple[np.ndarray, float]:
    """(seconds [moe layers, experts, widths]: each expert's expected share of a decode step at each
    width, the step's other seconds) for `stats`' MoE layers."""
    where = "profile"
    layers = {entry.get("layer"): entry for entry in profile.get("layers", []) if isinstance(entry, dict)}
    if sorted(layers) != list(stats.moe_layers):
        raise PlanError(f"{where}: its MoE layers {sorted(layers, key=str)} are not the stats' "
                        f"{list(stats.moe_layers)}: profile an artifact of this model")
    other = profile.get("other_seconds")
    if type(other) not in (int, float) or not math.isfinite(other) or other < 0:
        raise PlanError(f"{where}: other_seconds: expected a number >= 0, got {_show(other)}")
    cost = np.zeros((len(stats.moe_layers), stats.num_experts, len(widths)))
    for row, layer in enumerate(stats.moe_layers):
        entry = layers[layer]
        if entry.get("num_experts") != stats.num_experts:
            raise PlanError(f"{where}: layer {layer} has {_show(entry.get('num_experts'))} experts, the stats "
                            f"{stats.num_experts}")
        top_k = entry.get("top_k")
        seconds = entry.get("expert_seconds") or {}
        for j, width in enumerate(widths):
            if width == DROPPED:
                continue  # never routed to: no time
            if str(width) not in seconds:
                raise PlanError(f"{where}: layer {layer} has no time for width {width}: profile it "
                                f"(moec profile --bits)")
            t = _positive_number(seconds[str(width)], f"{where}: layer {layer} expert_seconds.{width}")
            cost[row, :, j] = _positive_number(top_k, f"{where}: layer {layer} top_k") * stats.frequency[row] * t
    return cost, float(other)


def step_seconds(cost: np.ndarray, other: float, choice: np.ndarray) -> float:
    """A plan's predicted decode step: `choice` [moe layers, experts] width indices into `cost`."""
    return other + float(np.take_along_axis(cost, choice[..., None], axis=2).sum())


def check_reachable(cost: np.ndarray, other: float, decode_tok_s: float) -> float:
    """The experts' seconds a step may take under `decode_tok_s`, or PlanError naming the fastest
    plan's speed when even every expert at its fastest width is too slow."""
    fastest = other + float(cost.min(axis=2).sum())
    if 1 / decode_tok_s < fastest:
        raise PlanError(f"decode budget {decode_tok_s:g} tok/s is out of reach on the profiled host: with every "
                        f"expert at its fastest width a step decodes at {1 / fastest:.4g} tok/s")
    return 1 / decode_tok_s - other


def check_profile_budget(decode_tok_s: Any, profile: Any) -> None:
    if decode_tok_s is not None:
        _positive_number(decode_tok_s, "decode_tok_s")
        if profile is None:
            raise PlanError("a decode budget (decode_tok_s) needs the host's profile (moec profile ARTIFACT)")
