"""Which layers prune dynamically, by which rule and threshold: the `pruning` section of plan.json
(validated with the rest of the plan in moec.planner).

    "pruning": {"layers": [{"layer": 3, "beta": 0.35}, ...], "protect_fraction": 0.0,
                "target": 0.15, "predicted_pruned_fraction": 0.151}

A layer prunes by MC-MoE's beta rule ({"layer": 3, "beta": 0.35}) or by the top-p rule
({"layer": 3, "top_p": 0.8}); see moec.ops.dynamic_gating.

`{}` prunes nothing. `target` and `predicted_pruned_fraction` are what `moec plan --prune-target`
asked and expects; hand-written plans may leave them out.

`plan_pruning` chooses from calibrate's per-layer curves (for each threshold of the rule on a grid:
the fraction of the layer's top-k activations the rule drops and the relative output error that
causes) one threshold or none per layer, so that the model's activations drop by at least the target fraction
at the least sum of squared relative errors (errors of different layers add up like independent
noise, so pruning spreads over layers rather than piling into one): a multiple-choice knapsack,
solved exactly with HiGHS.
Protected tokens keep all their experts, so with protect_fraction p the prediction is (1 - p)
times the curves (importance taken as independent of the routing weights). The curves do not
count super experts, which pruning keeps: with some protected the prediction is a little high.
"""

from __future__ import annotations

import numpy as np

from moec.planner import PlanError

ERROR_EXPONENT = 2  # errors of different layers add like independent noise: squared norms add


RULES = ("beta", "top_p")
# a threshold that prunes nothing is "off": beta 0, top_p 1
OFF = {"beta": 0.0, "top_p": 1.0}


def _curve(layer: dict, rule: str) -> dict | None:
    """The layer's calibrated curve for `rule`, or None where it has none (top-k 1, old stats)."""
    curve = layer.get("pruning") or {}
    curve = curve if rule == "beta" else curve.get("top_p") or {}
    return curve if curve.get(rule) else None


def plan_pruning(stats: dict, target: float, protect_fraction: float = 0.0, rule: str = "beta") -> dict:
    """The plan's `pruning` section removing at least `target` of all expert activations, by `rule`
    ("beta" or "top_p")."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    if not 0 < target < 1:
        raise PlanError(f"--prune-target must be a fraction between 0 and 1, got {target}")
    if not 0 <= protect_fraction < 1:
        raise PlanError(f"--protect-fraction must be in [0, 1), got {protect_fraction}")
    if rule not in RULES:
        raise PlanError(f"--prune-rule must be one of {', '.join(RULES)}, got {rule!r}")
    curves = [(layer, _curve(layer, rule)) for layer in stats["layers"]]
    layers = [layer for layer, curve in curves if curve]
    if not layers:
        raise PlanError(f"the stats hold no {rule} pruning curves (top-k is 1, or they come from a moec before "
                        f"{rule} curves were recorded): run moec calibrate again")
    # option 0 of each layer: no pruning; option j: the curve's j-th threshold
    options = [[(OFF[rule], 0.0, 0.0)] + list(zip(curve[rule], np.asarray(curve["pruned_fraction"]) *
                                                  (1 - protect_fraction), curve["relative_error"]))
               for _, curve in curves if curve]
    best = sum(max(fraction for _, fraction, _ in row) for row in options) / len(stats["layers"])
    if best < target:
        raise PlanError(f"--prune-target {target:g} is out of reach: pruning every layer at its strongest "
                        f"{rule} removes {best:.3f} of the expert activations")
    sizes = [len(row) for row in options]
    starts = np.cumsum([0] + sizes[:-1])
    count = sum(sizes)
    cost = np.concatenate([[error ** ERROR_EXPONENT for _, _, error in row] for row in options])
    removed = np.concatenate([[fraction for _, fraction, _ in row] for row in options]) / len(stats["layers"])
    one_per_layer = np.zeros((len(layers), count))
    for i, (start, size) in enumerate(zip(starts, sizes)):
        one_per_layer[i, start:start + size] = 1
    result = milp(cost, integrality=np.ones(count), bounds=Bounds(0, 1),
                  constraints=[LinearConstraint(one_per_layer, 1, 1), LinearConstraint(removed[None], target, np.inf)],
                  options={"mip_rel_gap": 0.0})
    if not result.success:
        raise PlanError(f"the pruning plan could not be solved: {result.message}")
    chosen = [int(np.argmax(result.x[start:start + size])) for start, size in zip(starts, sizes)]
    return {
        "layers": [{"layer": layer["layer"], rule: float(options[i][j][0])}
                   for i, (layer, j) in enumerate(zip(layers, chosen)) if j > 0],
        "protect_fraction": float(protect_fraction),
        "target": float(target),
        "predicted_pruned_fraction": float(sum(removed[start + j] for start, j in zip(starts, chosen))),
    }
