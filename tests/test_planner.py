"""Tests for moec.planner: the paper's allocation, solver optimality, budgets, and plan-file validation."""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moec.planner import (
    EXPERT_WIDTHS,
    PlanError,
    avg_bits_budget_bytes,
    expert_bytes,
    load_plan,
    load_stats,
    make_plan,
    parse_size,
    plot_sweep,
    predicted_loss,
    save_plan,
    sweep,
    validate_plan,
    write_sweep_table,
)

# CI clones the repo with shared/ beside it.
MIXTRAL_STATS = Path(__file__).resolve().parents[2] / "shared" / "data" / "mixtral-8x7b-mcmoe-stats.json"
# Mixtral-8x7B's config.json: hidden_size 4096, intermediate_size 14336; gate, up and down per expert.
MIXTRAL_PARAMS = 3 * 4096 * 14336

# The paper's own allocation: experts_mixture_bit_selection/experts_mixture_bitwidth_combination_{N}bit.pkl
# in github.com/Aaronhuang-778/MC-MoE (commit 7aa062c), N = bits per layer. One 8-digit group per layer
# (layers 0..31), one digit per expert (0..7). Copied as data.
RELEASED_ALLOCATION = {
    12: "13211121 11232111 13121121 11112123 31121112 22111113 12231111 23112111 "
        "23112111 31211112 21132111 21211311 21132111 12111231 11121231 11211231 "
        "22311111 31122111 11311212 12111321 12111312 12112131 12111213 11211132 "
        "23121111 21213111 13122111 11312211 11123121 13121211 13112211 13121121",
    13: "13221121 11233111 13121131 11113123 31131112 23111113 13231111 23113111 "
        "13112131 31311112 21133111 21311311 21133111 12111331 11131231 11311231 "
        "23311111 31123111 11313211 11113321 12111313 12111133 13111213 11211133 "
        "33121111 31213111 13132111 11313211 11113123 13123111 13111213 13221121",
    14: "23221121 11233211 13122131 11213123 31131122 23111123 13231211 23113211 "
        "23112131 32311112 22133111 21311321 21133121 22111331 11131232 11311232 "
        "23321111 31122311 11313212 12113321 12211313 12112133 13211213 21211133 "
        "33121112 31223111 13132112 11313212 11123123 13123211 13112213 23221121",
    15: "23221131 21233211 13123131 11213133 31131123 23111133 13331211 33113211 "
        "23113131 33311112 21133311 21311331 31133121 23111331 11131332 11311332 "
        "23311131 31123311 11333211 12113331 13211313 13112133 13311213 31211133 "
        "33121113 31213311 13133112 11313312 11123133 13323111 13311213 23231121",
    16: "23222131 21233311 13223131 12213133 31132123 23111233 13331212 33113221 "
        "23112331 33311212 22133311 21311332 31233121 23211331 13131232 12311332 "
        "23321131 33122311 11333212 12123331 23211313 23112133 13312213 31212133 "
        "33221113 31223311 13233112 11313322 13123123 13323211 13312213 23231122",
    17: "23322131 31233311 13233131 12313133 31132133 23111333 33331211 33113231 "
        "23113331 33311312 23133311 31311332 31233131 23113331 13131332 12311333 "
        "33321131 33123311 11333312 12133331 13213313 13132133 13331213 31312133 "
        "33123113 31323311 13333112 31313312 13123133 13323131 13313213 23231222",
    18: "23322132 32233311 23233131 22313133 31232133 23112333 33331212 33213231 "
        "23123331 33311322 23233311 23311332 32233131 23213331 23131332 12312333 "
        "33321231 33123312 21333312 12323331 23213313 23132133 13332213 31312233 "
        "33223113 31323312 23333112 31313322 13223133 13323231 13312233 23231232",
    19: "23332132 32333311 23333131 32313133 31332133 23131333 33331213 33213331 "
        "33123331 33311323 33233311 33311332 32333131 33213331 23131333 13312333 "
        "33331231 33133312 31333312 12333331 23313313 23133133 13333213 31312333 "
        "33123133 33323311 23333113 31313323 13233133 13323133 13313233 23232232",
    20: "23332232 32333321 23333231 32313233 31332233 23132333 33332213 33213332 "
        "33123332 33321323 33233312 33312332 32333231 33223331 23132333 23312333 "
        "33332231 33133322 21333332 32323331 23313323 23133233 23333213 32312333 "
        "33223133 33323312 23333213 32313323 13233233 13323233 13332233 23332232",
}


@pytest.fixture(scope="module")
def mixtral_stats() -> dict:
    if not MIXTRAL_STATS.is_file():
        pytest.skip(f"shared Mixtral statistics not found at {MIXTRAL_STATS}")
    return load_stats(MIXTRAL_STATS)


def synthetic_stats(seed: int, num_layers: int = 2, num_experts: int = 4, widths=(2, 3, 4),
                    dense_layers=(), **model) -> dict:
    """Random but plausible statistics: losses fall with bits, a few experts are rarely routed."""
    rng = np.random.default_rng(seed)
    layers = []
    for index in range(num_layers):
        if index in dense_layers:
            layers.append({"layer": index, "experts": None})
            continue
        experts = []
        for _ in range(num_experts):
            scale = rng.lognormal(5, 1)
            experts.append({
                "frequency": float(rng.integers(1, 1000)),
                "routing_weight": float(rng.uniform(1, 300)),
                "quant_loss": {str(w): float(scale * 2.0 ** -w * rng.uniform(0.7, 1.3)) for w in widths},
            })
        layers.append({"layer": index, "experts": experts})
    return {"format": "moec-stats/1",
            "model": {"model_type": "toy", "num_layers": num_layers, "num_experts": num_experts, "top_k": 2, **model},
            "layers": layers}


def layer_costs(stats: dict, widths, alpha=1.0, beta=1.5) -> np.ndarray:
    """Objective terms straight from the paper's formula, independent of the planner's code."""
    costs = []
    for layer in stats["layers"]:
        if layer["experts"] is None:
            continue
        f = np.array([e["frequency"] for e in layer["experts"]])
        w = np.array([e["routing_weight"] for e in layer["experts"]])
        loss = np.array([[e["quant_loss"][str(b)] for b in widths] for e in layer["experts"]])
        costs.append(((f / f.sum()) ** alpha * (w / w.sum()) ** beta)[:, None] * loss**alpha)
    return np.array(costs)


def protected(combos: np.ndarray, widths) -> np.ndarray:
    """Which width combinations hold at least one expert at each of the two highest widths."""
    return np.logical_and.reduce([(combos == w).any(axis=-1) for w in sorted(widths)[-2:]])


# ---------------------------------------------------------------- the paper's allocation


@pytest.mark.parametrize("bits_per_layer", sorted(RELEASED_ALLOCATION))
def test_layer_scope_reproduces_the_released_mixtral_allocation(mixtral_stats, bits_per_layer):
    plan = make_plan(mixtral_stats, avg_bits=bits_per_layer / 8, bits=[1, 2, 3], scope="layer")
    expected = [[int(d) for d in group] for group in RELEASED_ALLOCATION[bits_per_layer].split()]
    assert plan["experts"]["bits"] == expected
    assert all(sum(row) == bits_per_layer for row in plan["experts"]["bits"])


def test_global_scope_matches_an_exact_dynamic_program_on_mixtral(mixtral_stats):
    """Bytes are affine in bits here, so a byte budget is a total-bit budget; solve that exactly by DP."""
    widths = (1, 2, 3)
    byte_steps = {expert_bytes(MIXTRAL_PARAMS, b + 1) - expert_bytes(MIXTRAL_PARAMS, b) for b in (1, 2)}
    assert len(byte_steps) == 1
    combos = np.array(list(itertools.product(widths, repeat=8)))
    totals = combos.sum(axis=1)
    best_by_total = []  # per layer: least cost for each exact bit total 8..24
    for cost in layer_costs(mixtral_stats, widths):
        combo_cost = cost[np.arange(8), combos - 1].sum(axis=1)
        combo_cost[~protected(combos, widths)] = np.inf
        best_by_total.append([combo_cost[totals == t].min() for t in range(8, 25)])
    best = np.zeros(1)  # best[k]: least cost of the layers so far with k extra bits over 1 bit everywhere
    for table in best_by_total:
        grown = np.full(len(best) + 16, np.inf)
        for extra, value in enumerate(table):
            grown[extra:extra + len(best)] = np.minimum(grown[extra:extra + len(best)], best + value)
        best = grown
    for bits_per_layer in (12, 15, 18, 20):
        plan = make_plan(mixtral_stats, avg_bits=bits_per_layer / 8, params_per_expert=MIXTRAL_PARAMS)
        optimum = best[: 32 * (bits_per_layer - 8) + 1].min()
        assert plan["objective"]["predicted_loss"] == pytest.approx(optimum, rel=1e-9)
        assert sum(map(sum, plan["experts"]["bits"])) <= 32 * bits_per_layer


def test_global_scope_never_predicts_more_loss_than_the_layer_plan_of_equal_bytes(mixtral_stats):
    for bits_per_layer in range(12, 21):
        layer = make_plan(mixtral_stats, avg_bits=bits_per_layer / 8, scope="layer", params_per_expert=MIXTRAL_PARAMS)
        size = layer["objective"]["predicted_expert_bytes"]
        glob = make_plan(mixtral_stats, size_budget=size, params_per_expert=MIXTRAL_PARAMS)
        assert glob["objective"]["predicted_expert_bytes"] <= size
        assert glob["objective"]["predicted_loss"] <= layer["objective"]["predicted_loss"] * (1 + 1e-12)
        # On these statistics letting layers compete is worth a lot; a broken global solve would not show it.
        assert glob["objective"]["predicted_loss"] < 0.85 * layer["objective"]["predicted_loss"]
        for row in glob["experts"]["bits"]:
            assert 3 in row and 2 in row


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), budget_position=st.floats(0, 1), require_top_widths=st.booleans(),
       alpha=st.sampled_from([1.0, 2.0]), beta=st.sampled_from([1.0, 1.5]), loss_unit=st.sampled_from([1.0, 1e-12]))
def test_both_scopes_find_the_brute_force_optimum(seed, budget_position, require_top_widths, alpha, beta, loss_unit):
    """Tiny losses (loss_unit) must not hide behind the solver's absolute tolerances."""
    widths, params = (2, 3, 4), 3 * 64 * 256
    stats = synthetic_stats(seed)
    for layer in stats["layers"]:
        for expert in layer["experts"]:
            expert["quant_loss"] = {w: loss * loss_unit for w, loss in expert["quant_loss"].items()}
    cost = layer_costs(stats, widths, alpha, beta)
    combos = np.array(list(itertools.product(widths, repeat=8))).reshape(-1, 2, 4)  # (combos, layers, experts)
    combo_cost = np.take_along_axis(cost[None], (combos - 2)[..., None], axis=3)[..., 0].sum(axis=2)
    allowed = protected(combos, widths) if require_top_widths else np.ones(combos.shape[:2], bool)
    options = dict(alpha=alpha, beta=beta, require_top_widths=require_top_widths, params_per_expert=params)

    per_layer = 8 + round(budget_position * 8)  # 8..16 bits for 4 experts, all feasible when unprotected
    if not require_top_widths or per_layer >= 4 + 3 + 2 + 2:
        layer_plan = make_plan(stats, avg_bits=per_layer / 4, scope="layer", **options)
        fits = allowed & (combos.sum(axis=2) <= per_layer)
        optimum = np.where(fits, combo_cost, np.inf).min(axis=0).sum()
        assert layer_plan["objective"]["predicted_loss"] == pytest.approx(optimum, rel=1e-9)

    byte_cost = np.vectorize(lambda b: expert_bytes(params, int(b)))(combos).sum(axis=(1, 2))
    smallest = byte_cost[allowed.all(axis=1)].min()
    budget = int(smallest + budget_position * (byte_cost.max() - smallest))
    global_plan = make_plan(stats, size_budget=budget, **options)
    fits = allowed.all(axis=1) & (byte_cost <= budget)
    assert global_plan["objective"]["predicted_loss"] == pytest.approx(combo_cost.sum(axis=1)[fits].min(), rel=1e-9)
    assert global_plan["objective"]["predicted_expert_bytes"] <= budget


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), budget_position=st.floats(0, 1), protect=st.booleans(),
       barred=st.booleans())
def test_dropping_and_super_experts_find_the_brute_force_optimum(seed, budget_position, protect, barred):
    """Width 0 drops an expert (no bytes; at most experts - top_k a layer); a super expert sits at the
    highest width; a layer whose width-0 losses are null (it picks experts without a top-k) drops none;
    the solver's plan is the best allocation that obeys all three."""
    widths, params = (0, 2, 4), 3 * 64 * 256
    stats = synthetic_stats(seed, widths=(2, 4))
    for layer in stats["layers"]:
        for expert in layer["experts"]:
            expert["quant_loss"]["0"] = 4 * expert["quant_loss"]["2"]  # dropping costs more than 2 bits
    stats["super_experts"] = [[1, seed % 4]]
    cost = layer_costs(stats, widths)
    combos = np.array(list(itertools.product(widths, repeat=8))).reshape(-1, 2, 4)
    combo_cost = np.take_along_axis(cost[None], (combos // 2)[..., None], axis=3)[..., 0].sum(axis=2)
    allowed = ((combos == 0).sum(axis=2) <= 4 - 2).all(axis=1)  # top-2 of 4: at most 2 dropped a layer
    if protect:
        allowed &= combos[:, 1, seed % 4] == 4
    if barred:
        for expert in stats["layers"][0]["experts"]:
            expert["quant_loss"]["0"] = None
        allowed &= (combos[:, 0] != 0).all(axis=1)
    byte_cost = np.vectorize(lambda b: expert_bytes(params, int(b)))(combos).sum(axis=(1, 2))
    smallest = byte_cost[allowed].min()
    budget = int(smallest + budget_position * (byte_cost.max() - smallest))
    plan = make_plan(stats, size_budget=budget, bits=list(widths), require_top_widths=False,
                     params_per_expert=params, protect_super_experts=protect)
    fits = allowed & (byte_cost <= budget)
    assert plan["objective"]["predicted_loss"] == pytest.approx(combo_cost.sum(axis=1)[fits].min(), rel=1e-9)
    assert plan["objective"]["predicted_expert_bytes"] <= budget
    assert all(row.count(0) <= 2 for row in plan["experts"]["bits"])
    if barred:
        assert 0 not in plan["experts"]["bits"][0]
        dropping = [[0, 2, 2, 2], plan["experts"]["bits"][1]]
        with pytest.raises(PlanError, match="layer 0 expert 0: width 0, but the layer picks its experts without"):
            predicted_loss(stats, dropping)
    assert plan["super_experts"] == ([[1, seed % 4]] if protect else [])
    assert plan["objective"]["protect_super_experts"] is protect
    if protect:
        assert plan["experts"]["bits"][1][seed % 4] == 4
        with pytest.raises(PlanError, match=r"and the 1 super experts at 4 bits \(--no-protect-super-experts"):
            make_plan(stats, size_budget=int(smallest) - 1, bits=list(widths), require_top_widths=False,
                      params_per_expert=params)


def with_projection_losses(stats: dict, seed: int) -> dict:
    """Each expert's gate-and-up and down losses, each a random share of its whole loss."""
    rng = np.random.default_rng(seed)
    for layer in stats["layers"]:
        for expert in layer["experts"] or []:
            share = rng.uniform(0.2, 0.8)
            expert["projection_loss"] = {
                "gate_up": {w: share * loss * rng.uniform(0.7, 1.3) for w, loss in expert["quant_loss"].items()},
                "down": {w: (1 - share) * loss * rng.uniform(0.7, 1.3) for w, loss in expert["quant_loss"].items()}}
    return stats


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), budget_position=st.floats(0, 1))
def test_per_projection_plans_find_the_brute_force_optimum(seed, budget_position):
    """With per_projection each expert takes a (gate and up, down) pair of widths: the plan is the best
    allocation of pairs under the byte budget, a whole expert weighed by its quant_loss, a split one by
    the root sum of squares of its parts' losses, each stored as its parts are (down_proj a third of
    the weights)."""
    widths, params = (2, 4), 3 * 64 * 256
    stats = with_projection_losses(synthetic_stats(seed, num_experts=3, widths=widths), seed)
    pairs = list(itertools.product(widths, repeat=2))

    def pair_bytes(pair):
        return expert_bytes(params, pair[0]) if pair[0] == pair[1] else \
            expert_bytes(2 * params // 3, pair[0]) + expert_bytes(params // 3, pair[1])

    experts = [(e["frequency"], e["routing_weight"], e["quant_loss"], e["projection_loss"])
               for layer in stats["layers"] for e in layer["experts"]]
    layer_sums = [(sum(e["frequency"] for e in layer["experts"]), sum(e["routing_weight"] for e in layer["experts"]))
                  for layer in stats["layers"] for _ in layer["experts"]]
    def loss(whole, parts, a, b):
        return whole[str(a)] if a == b else math.sqrt(parts["gate_up"][str(a)] ** 2 + parts["down"][str(b)] ** 2)

    cost = np.array([[f / fs * (w / ws) ** 1.5 * loss(whole, parts, a, b) for a, b in pairs]
                     for (f, w, whole, parts), (fs, ws) in zip(experts, layer_sums)])  # (experts, pairs)
    combos = np.array(list(itertools.product(range(len(pairs)), repeat=len(experts))))
    combo_cost = cost[np.arange(len(experts)), combos].sum(axis=1)
    combo_bytes = np.array([pair_bytes(pair) for pair in pairs])[combos].sum(axis=1)
    budget = int(combo_bytes.min() + budget_position * (combo_bytes.max() - combo_bytes.min()))
    plan = make_plan(stats, size_budget=budget, require_top_widths=False, params_per_expert=params,
                     per_projection=True)
    assert plan["objective"]["predicted_loss"] == pytest.approx(combo_cost[combo_bytes <= budget].min(), rel=1e-9)
    chosen = [(plan["experts"]["bits"][layer][e], plan["experts"]["down_bits"][layer][e])
              for layer in range(2) for e in range(3)]
    assert plan["objective"]["predicted_expert_bytes"] == sum(map(pair_bytes, chosen)) <= budget
    assert plan["objective"]["per_projection"] is True
    whole = make_plan(stats, size_budget=budget, require_top_widths=False, params_per_expert=params)
    assert "down_bits" not in whole["experts"] and whole["objective"]["per_projection"] is False
    from moec.policy import weight_bits

    for name, layer, e, proj in (("layers.1.experts.2.down_proj", 1, 2, 1), ("layers.1.experts.2.up_proj", 1, 2, 0)):
        assert weight_bits(plan, name) == chosen[3 * layer + e][proj]


def test_per_projection_needs_the_global_scope_and_projection_losses():
    stats = synthetic_stats(3, widths=(2, 4))
    with pytest.raises(PlanError, match="per_projection needs each expert's projection_loss, which moec calibrate"):
        make_plan(stats, avg_bits=3, params_per_expert=3 * 64 * 256, per_projection=True)
    with_projection_losses(stats, 3)
    with pytest.raises(PlanError, match="per_projection needs scope \"global\""):
        make_plan(stats, avg_bits=3, scope="layer", per_projection=True)
    del stats["layers"][1]["experts"][2]["projection_loss"]
    with pytest.raises(PlanError, match="projection_loss: some experts have it and others not"):
        load_stats_dict(stats)
    stats["layers"][1]["experts"][2]["projection_loss"] = {"gate_up": {"2": 1.0}, "down": {"2": 1.0, "4": 0.5}}
    with pytest.raises(PlanError, match=re.escape("experts[2].projection_loss.gate_up: expected a loss for each of "
                                                  "the widths [2, 4]")):
        load_stats_dict(stats)


def load_stats_dict(stats: dict):
    return make_plan(stats, avg_bits=3, params_per_expert=3 * 64 * 256)


@pytest.mark.parametrize("edit, message", [
    (lambda down: down.__setitem__(1, [2, 2]),
     "experts.down_bits[1]: expected 4 widths, as experts.bits[1], got [2, 2]"),
    (lambda down: down.__setitem__(0, [2, 2, 2, 2]), "experts.down_bits[0]: expected null, as experts.bits[0]"),
    (lambda down: down.pop(), "experts.down_bits: expected a list with one entry per layer, as bits"),
    (lambda down: down[1].__setitem__(0, 0), "experts.down_bits[1][0]: width 0 drops the whole expert: give it in "
                                             "both bits and down_bits"),
    (lambda down: down[2].__setitem__(1, "float"), "experts.down_bits[2][1]: width \"float\" keeps in float the "
                                                    "whole expert"),
    (lambda down: down[2].__setitem__(1, 5), "experts.down_bits[2][1]: expected a bit width"),
])
def test_malformed_down_bits_are_refused_naming_the_field(plan, edit, message):
    plan["experts"]["down_bits"] = copy.deepcopy(plan["experts"]["bits"])
    validate_plan(plan)
    edit(plan["experts"]["down_bits"])
    with pytest.raises(PlanError, match=re.escape(message)):
        validate_plan(plan)


def test_a_dropped_super_expert_and_bad_stats_super_experts_are_refused(plan):
    plan["super_experts"] = [[1, 2]]
    plan["experts"]["bits"][1][2] = 0
    with pytest.raises(PlanError, match=re.escape("super_experts[0]: [1, 2] is a super expert, which experts.bits "
                                                  "drops (width 0)")):
        validate_plan(plan)
    stats = synthetic_stats(4, num_layers=3, dense_layers=(0,))
    for bad in ([[0, 1]], [[1, 4]], [[1]], "1,2"):
        stats["super_experts"] = bad
        with pytest.raises(PlanError, match="super_experts: expected \\[layer, expert\\] pairs of the MoE layers"):
            make_plan(stats, avg_bits=3, scope="layer")


def test_width_0_is_never_a_top_width_and_never_the_only_one():
    stats = synthetic_stats(5, widths=(0, 2, 4))
    plan = make_plan(stats, avg_bits=4, bits=[0, 4], scope="layer")  # the top-width rule asks for one at 4 bits
    assert all(row == [4, 4, 4, 4] for row in plan["experts"]["bits"])
    with pytest.raises(PlanError, match="width 0 alone would drop every expert"):
        make_plan(stats, avg_bits=2, bits=[0], scope="layer")


def test_dropping_needs_the_stats_top_k_and_costs_no_bytes():
    assert expert_bytes(1000, 0) == 0
    stats = synthetic_stats(3, widths=(0, 2, 4))
    del stats["model"]["top_k"]
    with pytest.raises(PlanError, match="needs the stats' model.top_k"):
        make_plan(stats, avg_bits=2, bits=[0, 2, 4], scope="layer")
    # dropping only when --bits names width 0, even if the stats measured it
    plan = make_plan(stats, avg_bits=2, scope="layer", require_top_widths=False)
    assert plan["objective"]["candidate_bits"] == [2, 4]


# ---------------------------------------------------------------- budgets and bad input


def test_infeasible_layer_budget_names_the_smallest_feasible_one(mixtral_stats):
    with pytest.raises(PlanError, match=r"smallest feasible budget is avg_bits 1\.375 \(11 bits per layer\)"):
        make_plan(mixtral_stats, avg_bits=1.3, bits=[1, 2, 3], scope="layer")
    tightest = make_plan(mixtral_stats, avg_bits=1.375, scope="layer")
    assert all(sorted(row) == [1, 1, 1, 1, 1, 1, 2, 3] for row in tightest["experts"]["bits"])
    unprotected = make_plan(mixtral_stats, avg_bits=1.0, scope="layer", require_top_widths=False)
    assert all(row == [1] * 8 for row in unprotected["experts"]["bits"])
    with pytest.raises(PlanError, match=r"smallest feasible budget is avg_bits 1 \(8 bits per layer\)"):
        make_plan(mixtral_stats, avg_bits=0.99, scope="layer", require_top_widths=False)


def test_infeasible_global_budget_names_a_budget_that_works(mixtral_stats):
    smallest = 32 * sum(expert_bytes(MIXTRAL_PARAMS, b) for b in (3, 2, 1, 1, 1, 1, 1, 1))
    plan = make_plan(mixtral_stats, size_budget=smallest, params_per_expert=MIXTRAL_PARAMS)
    assert plan["objective"]["predicted_expert_bytes"] == smallest
    with pytest.raises(PlanError) as error:
        make_plan(mixtral_stats, size_budget=smallest - 1, params_per_expert=MIXTRAL_PARAMS)
    message = str(error.value)
    assert f"smallest feasible budget is {smallest} bytes" in message and "\n" not in message
    stated_avg_bits = float(re.search(r"avg_bits ([0-9.]+)\)", message).group(1))
    make_plan(mixtral_stats, avg_bits=stated_avg_bits, params_per_expert=MIXTRAL_PARAMS)
    with pytest.raises(PlanError, match="smallest feasible budget"):
        make_plan(mixtral_stats, avg_bits=stated_avg_bits - 0.001, params_per_expert=MIXTRAL_PARAMS)


def test_unknown_bit_width_is_refused(mixtral_stats):
    with pytest.raises(PlanError, match=r"unknown bit width 4: the stats have quant_loss for \[1, 2, 3\]"):
        make_plan(mixtral_stats, avg_bits=2.5, bits=[2, 4], scope="layer")


@pytest.mark.parametrize("options, message", [
    (dict(avg_bits=2.5, size_budget="10GB"), "exactly one budget of bytes"),
    (dict(), "exactly one budget of bytes (avg_bits or size_budget), or a decode budget"),
    (dict(size_budget="10GB", scope="layer"), "size_budget needs scope"),
    (dict(avg_bits=2.5, scope="model"), "scope: expected one of global, layer"),
    (dict(avg_bits=2.5, beta=float("nan")), "beta: expected a finite number"),
    (dict(avg_bits=-1.0, scope="layer"), "avg_bits: expected a positive number"),
    (dict(avg_bits=2.5), "needs the expert parameter count"),
    (dict(size_budget="lots"), "expected a number with a unit"),
])
def test_bad_planning_options_raise_one_line_errors(mixtral_stats, options, message):
    with pytest.raises(PlanError, match=re.escape(message)) as error:
        make_plan(mixtral_stats, **options)
    assert "\n" not in str(error.value)


def set_in(tree, path, value):
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


@pytest.mark.parametrize("path, value, message", [
    (("layers", 1, "experts", 2, "frequency"), float("nan"), "layers[1].experts[2].frequency: expected a finite number >= 0, got NaN"),
    (("layers", 0, "experts", 3, "routing_weight"), -1.0, "layers[0].experts[3].routing_weight: expected a finite number >= 0, got -1.0"),
    (("layers", 1, "experts", 0, "quant_loss", "3"), float("inf"), "layers[1].experts[0].quant_loss[\"3\"]: expected a finite number >= 0, got Infinity"),
    (("layers", 1, "experts", 0, "quant_loss", "3"), "big", "quant_loss[\"3\"]: expected a finite number >= 0, got \"big\""),
    (("layers", 1, "experts", 0, "quant_loss", "3"), None, "quant_loss[\"3\"]: expected a finite number >= 0, got null"),
    (("layers", 0, "experts", 1, "quant_loss"), {"2": 1.0, "3": 0.5}, "layers[0].experts[1].quant_loss: has widths [2, 3], other experts have [2, 3, 4]"),
    (("layers", 0, "experts", 1, "quant_loss"), {"two": 1.0}, "expected bit-width keys like"),
    (("layers", 1, "layer"), 0, "layers[1].layer: layer 0 appears twice"),
    (("layers", 1, "layer"), 7, "layers[1].layer: expected an int in [0, 2), got 7"),
    (("layers", 1, "experts"), [], "layers[1].experts: expected a list of 4 experts or null"),
    (("format",), "moec-stats/2", "format: expected \"moec-stats/1\""),
    (("model", "num_experts"), "8", "model.num_experts: expected a positive int"),
])
def test_bad_statistics_are_refused_naming_the_field(path, value, message):
    stats = synthetic_stats(0)
    set_in(stats, path, value)
    with pytest.raises(PlanError, match=re.escape(message)) as error:
        make_plan(stats, avg_bits=3, scope="layer")
    assert "\n" not in str(error.value)


def test_layer_whose_experts_are_never_routed_is_refused():
    stats = synthetic_stats(0)
    for expert in stats["layers"][1]["experts"]:
        expert["frequency"] = 0.0
    with pytest.raises(PlanError, match="layer 1: every expert has frequency 0"):
        make_plan(stats, avg_bits=3, scope="layer")


def test_load_stats_reports_file_problems(tmp_path):
    broken = tmp_path / "stats.json"
    broken.write_text("{\"format\": ")
    with pytest.raises(PlanError, match=r"stats\.json: not valid JSON: .* line 1"):
        load_stats(broken)
    with pytest.raises(PlanError, match="cannot read"):
        load_stats(tmp_path / "missing.json")
    stats = synthetic_stats(0)
    stats["layers"][0]["experts"][0]["frequency"] = float("nan")
    broken.write_text(json.dumps(stats))  # json writes NaN, which Python's reader accepts
    with pytest.raises(PlanError, match=r"stats\.json: layers\[0\]\.experts\[0\]\.frequency: .* got NaN"):
        load_stats(broken)


def test_stats_from_another_model_are_refused(mixtral_stats, tmp_path):
    with pytest.raises(PlanError, match="stats are for a different model: mistralai/Mixtral-8x7B-v0.1"):
        make_plan(mixtral_stats, avg_bits=2.5, scope="layer", model="mistralai/Mixtral-8x22B-v0.1")
    same = make_plan(mixtral_stats, avg_bits=2.5, scope="layer", model="/models/Mixtral-8x7B-v0.1/")
    assert same["model"] == "/models/Mixtral-8x7B-v0.1/"

    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(
        {"model_type": "qwen2_moe", "num_hidden_layers": 24, "num_experts": 60, "hidden_size": 2048}))
    with pytest.raises(PlanError, match="mixtral with 32 layers and 8 experts, but .* is qwen2_moe with 24 layers"):
        make_plan(mixtral_stats, avg_bits=2.5, scope="layer", model=folder)

    (folder / "config.json").write_text(json.dumps(
        {"model_type": "mixtral", "num_hidden_layers": 32, "num_local_experts": 8,
         "hidden_size": 4096, "intermediate_size": 14336}))
    plan = make_plan(mixtral_stats, avg_bits=2.5, model=folder)  # global scope: parameter count from config.json
    assert plan["objective"]["params_per_expert"] == MIXTRAL_PARAMS
    assert plan["model"] == str(folder)


def test_dense_first_layers_get_null_bits():
    stats = synthetic_stats(3, num_layers=4, dense_layers=(0,), hidden_size=64, intermediate_size=512,
                            moe_intermediate_size=128)
    del stats["layers"][1]  # an absent layer is dense too
    plan = make_plan(stats, avg_bits=3)
    assert plan["objective"]["params_per_expert"] == 3 * 64 * 128  # the expert size, not the dense MLP's
    bits = plan["experts"]["bits"]
    assert bits[0] is None and bits[1] is None and all(len(row) == 4 for row in bits[2:])
    validate_plan(plan, num_layers=4, num_experts=4)
    assert predicted_loss(stats, bits) == pytest.approx(plan["objective"]["predicted_loss"])
    with pytest.raises(PlanError, match=r"bits\[0\]: expected null"):
        predicted_loss(stats, [[2, 2, 2, 2]] + bits[1:])


def test_predicted_loss_follows_the_formula():
    stats = {"format": "moec-stats/1", "model": {"model_type": "toy", "num_layers": 1, "num_experts": 2},
             "layers": [{"layer": 0, "experts": [
                 {"frequency": 3.0, "routing_weight": 1.0, "quant_loss": {"2": 10.0, "4": 2.0}},
                 {"frequency": 1.0, "routing_weight": 3.0, "quant_loss": {"2": 20.0, "4": 5.0}}]}]}
    # f = (3/4, 1/4), w = (1/4, 3/4)
    assert predicted_loss(stats, [[2, 4]]) == pytest.approx(0.75 * 0.25**1.5 * 10 + 0.25 * 0.75**1.5 * 5)
    assert predicted_loss(stats, [[4, "float"]], alpha=2, beta=1, gamma=0.5) == pytest.approx(0.75**2 * 0.25 * 2**0.5)
    with pytest.raises(PlanError, match="unknown bit width 3"):
        predicted_loss(stats, [[3, 4]])


# ---------------------------------------------------------------- sizes


def test_expert_bytes_counts_codes_scales_and_zero_points():
    groups = MIXTRAL_PARAMS // 128  # 1,376,256 groups of 128 inputs
    assert expert_bytes(MIXTRAL_PARAMS, 2) == MIXTRAL_PARAMS // 4 + 4 * groups + groups // 4 == 49_889_280
    assert expert_bytes(MIXTRAL_PARAMS, 3) == 66_060_288 + 5_505_024 + 516_096
    assert expert_bytes(MIXTRAL_PARAMS, "float") == 4 * MIXTRAL_PARAMS
    assert expert_bytes(MIXTRAL_PARAMS, 4, group_size=64) - expert_bytes(MIXTRAL_PARAMS, 4) == groups * (4 + 0.5)
    assert expert_bytes(1000, 3, group_size=128) == 375 + 4 * 8 + 3  # partial bytes and groups round up
    with pytest.raises(PlanError, match="params: expected a positive int"):
        expert_bytes(0, 2)


def test_expert_bytes_on_a_target_count_its_containers_and_scale_type():
    """CUDA stores 1- to 3-bit codes in 4-bit MatMulNBits with float16 scales; CPU has 2-bit but not
    1- or 3-bit kernels. Without a target, widths pack as planned with float32 scales."""
    groups = MIXTRAL_PARAMS // 128
    assert expert_bytes(MIXTRAL_PARAMS, 2, target="cuda") == MIXTRAL_PARAMS // 2 + 2 * groups + groups // 2
    assert expert_bytes(MIXTRAL_PARAMS, 8, target="cuda") == MIXTRAL_PARAMS + 2 * groups + groups
    assert expert_bytes(MIXTRAL_PARAMS, 2, target="cpu") == expert_bytes(MIXTRAL_PARAMS, 2)
    assert expert_bytes(MIXTRAL_PARAMS, 3, target="cpu") == expert_bytes(MIXTRAL_PARAMS, 4)
    assert expert_bytes(MIXTRAL_PARAMS, "float", target="cuda") == expert_bytes(MIXTRAL_PARAMS, "float")


def test_a_plan_for_cuda_predicts_what_the_cuda_artifact_stores():
    plan = make_plan(synthetic_stats(3), avg_bits=4, bits=[2, 4], params_per_expert=MIXTRAL_PARAMS,
                     require_top_widths=False, target="cuda")
    widths = [b for row in plan["experts"]["bits"] if row for b in row]
    assert plan["objective"]["predicted_expert_bytes"] == \
        sum(expert_bytes(MIXTRAL_PARAMS, b, target="cuda") for b in widths)
    # a 2-bit expert costs as much as a 4-bit one there, so the solver has no reason to pick 2 bits
    assert set(widths) == {4}


def test_avg_bits_budget_is_the_uniform_allocation_size():
    experts = 32 * 8
    for bits in (1, 2, 3, 4, 8):
        assert avg_bits_budget_bytes(bits, MIXTRAL_PARAMS, experts) == experts * expert_bytes(MIXTRAL_PARAMS, bits)
    halfway = avg_bits_budget_bytes(2.5, MIXTRAL_PARAMS, experts)
    assert halfway == experts * (expert_bytes(MIXTRAL_PARAMS, 2) + expert_bytes(MIXTRAL_PARAMS, 3)) // 2


@pytest.mark.parametrize("text, size", [
    ("3.5GB", 3_500_000_000), ("800MB", 800_000_000), ("1.2GiB", round(1.2 * 2**30)), ("512 KiB", 524_288),
    ("100", 100), ("1.5tb", 1_500_000_000_000), (" 2 gb ", 2_000_000_000), (".5MiB", 524_288), (7, 7),
])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GB", "3.5 GX", "-1GB", "0GB", "1e9", "1,5GB", None, 0, 2.5])
def test_parse_size_refuses_garbage(text):
    with pytest.raises(PlanError, match="size"):
        parse_size(text)


# ---------------------------------------------------------------- sweep


def test_sweep_returns_a_pareto_front(mixtral_stats, tmp_path):
    rows = sweep(mixtral_stats, 1.5, 2.5, 0.125, params_per_expert=MIXTRAL_PARAMS)
    assert [row["avg_bits"] for row in rows] == [1.5 + 0.125 * k for k in range(9)]
    assert all(a["expert_bytes"] < b["expert_bytes"] and a["predicted_loss"] > b["predicted_loss"]
               for a, b in zip(rows, rows[1:]))

    write_sweep_table(rows, tmp_path / "front.tsv")
    lines = (tmp_path / "front.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["avg_bits", "mean_bits", "expert_bytes", "expert_GB", "predicted_loss"]
    assert len(lines) == 10 and lines[1].split("\t")[2] == str(rows[0]["expert_bytes"])
    write_sweep_table(rows, tmp_path / "front.md")
    assert (tmp_path / "front.md").read_text().splitlines()[1] == "| --- | --- | --- | --- | --- |"


def test_sweep_drops_budgets_that_buy_nothing(mixtral_stats):
    # 1.5 .. 1.6 avg bits all round down to 12 bits per layer: one allocation, one row.
    rows = sweep(mixtral_stats, 1.5, 1.6, 0.025, scope="layer")
    assert len(rows) == 1 and rows[0]["expert_bytes"] is None and rows[0]["mean_bits"] == 1.5
    with pytest.raises(PlanError, match="expected start <= stop and step > 0"):
        sweep(mixtral_stats, 2.0, 1.0, 0.25, scope="layer")


def test_sweep_plot_is_a_png(mixtral_stats, tmp_path):
    pytest.importorskip("matplotlib")
    rows = sweep(mixtral_stats, 1.5, 2.5, 0.25, params_per_expert=MIXTRAL_PARAMS)
    plot_sweep(rows, tmp_path / "front.png")
    assert (tmp_path / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_plot_without_matplotlib_says_what_to_install(monkeypatch, tmp_path):
    for name in ("matplotlib.backends.backend_agg", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)
    rows = [{"avg_bits": 2.0, "mean_bits": 2.0, "expert_bytes": 10, "predicted_loss": 1.0}]
    with pytest.raises(PlanError, match=r"needs matplotlib \(pip install matplotlib\)"):
        plot_sweep(rows, tmp_path / "front.png")
    assert not (tmp_path / "front.png").exists()


# ---------------------------------------------------------------- plan files


def test_a_plan_file_with_the_greek_exponent_names_still_loads(tmp_path):
    """Plan files written before the objective's exponents were renamed say alpha, beta and gamma."""
    plan = make_plan(synthetic_stats(1, num_layers=3, dense_layers=(0,)), avg_bits=3, scope="layer")
    objective = plan["objective"]
    old = {**plan, "objective": {{"frequency_exponent": "alpha", "weight_exponent": "beta",
                                  "loss_exponent": "gamma"}.get(key, key): value for key, value in objective.items()}}
    (tmp_path / "plan.json").write_text(json.dumps(old))
    assert "beta" in old["objective"] and load_plan(tmp_path / "plan.json") == plan


def test_a_plan_file_that_writes_16_for_float_still_loads(tmp_path):
    """Plan files written before "float" named an unquantized weight's width 16."""
    plan = make_plan(synthetic_stats(1, num_layers=3, dense_layers=(0,)), avg_bits=3, scope="layer")
    plan["experts"]["bits"][1][0] = "float"
    plan["non_expert"]["embedding"] = "float"
    old = json.loads(json.dumps(plan).replace('"float"', "16"))
    (tmp_path / "plan.json").write_text(json.dumps(old))
    assert old["experts"]["bits"][1][0] == 16 and load_plan(tmp_path / "plan.json") == plan
    with pytest.raises(PlanError, match=r"experts.bits\[1\]\[0\]: expected a bit width"):
        validate_plan(old)  # a plan made in memory says "float"


@pytest.fixture
def plan() -> dict:
    return make_plan(synthetic_stats(1, num_layers=3, dense_layers=(0,)), avg_bits=3, scope="layer")


def test_plan_has_the_documented_schema(plan):
    assert plan["format"] == "moec-plan/1"
    assert plan["non_expert"] == {"attention": 4, "shared_expert": 4, "dense_mlp": 4, "embedding": 8, "lm_head": 8}
    assert plan["quantization"] == {"method": "rtn", "group_size": 128, "grid": "minmax", "layer_prior_tokens": 0}
    del plan["quantization"]["grid"], plan["quantization"]["layer_prior_tokens"]
    validate_plan(plan)  # plans from before the weighted grid and the layer prior: minmax, no prior
    stats = synthetic_stats(1, num_layers=3, dense_layers=(0,))
    assert make_plan(stats, avg_bits=3, scope="layer", method="gptq")["quantization"]["grid"] == "weighted"
    assert make_plan(stats, avg_bits=3, scope="layer", method="gptq", grid="minmax")["quantization"]["grid"] == "minmax"
    assert make_plan(stats, avg_bits=3, scope="layer", method="gptq")["quantization"]["layer_prior_tokens"] == 256
    assert make_plan(stats, avg_bits=3, scope="layer", method="gptq",
                     layer_prior_tokens=0)["quantization"]["layer_prior_tokens"] == 0
    assert plan["pruning"] == {}
    assert plan["experts"]["bits"][0] is None
    objective = plan["objective"]
    assert objective["scope"] == "layer" and objective["frequency_exponent"] == 1.0 and objective["weight_exponent"] == 1.5
    assert objective["candidate_bits"] == [2, 3, 4] and objective["budget"] == {"avg_bits": 3.0, "bytes": None}
    assert objective["predicted_expert_bytes"] is None and objective["predicted_loss"] > 0


def test_plan_round_trips_through_a_file(plan, tmp_path):
    path = tmp_path / "plan.json"
    save_plan(plan, path)
    assert load_plan(path, num_layers=3, num_experts=4) == plan
    assert os.listdir(tmp_path) == ["plan.json"]


def test_save_plan_never_leaves_a_half_written_file(plan, tmp_path, monkeypatch):
    path = tmp_path / "plan.json"
    save_plan(plan, path)
    before = path.read_bytes()
    broken = copy.deepcopy(plan)
    broken["experts"]["bits"][1][0] = "x"
    with pytest.raises(PlanError):
        save_plan(broken, path)

    def crash(*args):
        raise OSError("disk full")

    other = copy.deepcopy(plan)
    other["model"] = "elsewhere"
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        save_plan(other, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["plan.json"]


@pytest.mark.parametrize("path, value, message", [
    (("format",), "moec-plan/2", "plan.json: format: expected \"moec-plan/1\", got \"moec-plan/2\""),
    (("model",), 3, "plan.json: model: expected a model path or null, got 3"),
    (("experts", "bits", 1, 2), "x", "plan.json: experts.bits[1][2]: expected a bit width in {0,1,2,3,4,8} or \"float\", got \"x\""),
    (("experts", "bits", 2, 0), float("nan"), "experts.bits[2][0]: expected a bit width in {0,1,2,3,4,8} or \"float\", got NaN"),
    (("experts", "bits", 2, 3), 2.0, "experts.bits[2][3]: expected a bit width in {0,1,2,3,4,8} or \"float\", got 2.0"),
    (("experts", "bits", 1, 1), True, "experts.bits[1][1]: expected a bit width in {0,1,2,3,4,8} or \"float\", got true"),
    (("experts", "bits", 1, 1), 5, "got 5"),
    (("experts", "bits", 2), [2, 2], "plan.json: experts.bits[2]: expected 4 experts (as in experts.bits[1]), got 2"),
    (("experts", "bits", 1), "2222", "experts.bits[1]: expected a list of expert bit widths or null"),
    (("experts", "bits"), [], "plan.json: experts.bits: expected a list with one entry per layer"),
    (("experts", "bits"), [None, None], "experts.bits: no layer has experts"),
    (("experts", "extra"), 1, "plan.json: experts: unknown key \"extra\""),
    (("non_expert", "attention"), 5, "plan.json: non_expert.attention: expected a bit width"),
    (("non_expert", "router"), 8, "plan.json: non_expert: unknown key \"router\""),
    (("quantization", "group_size"), 100, "quantization.group_size: expected a power of two >= 16, got 100"),
    (("quantization", "method"), "awq", "quantization.method: expected one of rtn, gptq, got \"awq\""),
    (("quantization", "grid"), "hqq", "quantization.grid: expected one of minmax, weighted, got \"hqq\""),
    (("quantization", "layer_prior_tokens"), -1, "quantization.layer_prior_tokens: expected a whole number >= 0"),
    (("quantization", "layer_prior_tokens"), 1.5, "quantization.layer_prior_tokens: expected a whole number >= 0"),
    (("pruning",), [], "plan.json: pruning: expected an object, got []"),
    (("non_expert", "attention"), 0, "plan.json: non_expert.attention: expected a bit width in {1,2,3,4,8}"),
    (("super_experts",), [[1, 4]], "plan.json: super_experts[0]: [1, 4] is not an expert of a MoE layer"),
    (("super_experts",), [[0, 1]], "super_experts[0]: [0, 1] is not an expert of a MoE layer"),
    (("super_experts",), [[1, 1], [1, 1]], "super_experts[1]: [1, 1] is listed twice"),
    (("super_experts",), [[1, -1]], "super_experts[0]: expected a [layer, expert] pair, got [1, -1]"),
    (("super_experts",), {"1": 1}, "plan.json: super_experts: expected a list of [layer, expert] pairs"),
    (("objective", "protect_super_experts"), 1, "objective.protect_super_experts: expected true or false, got 1"),
    (("objective", "frequency_exponent"), float("nan"),
     "objective.frequency_exponent: expected a finite number >= 0, got NaN"),
    (("objective", "scope"), "model", "objective.scope: expected one of global, layer"),
    (("objective", "budget", "bytes"), -1, "objective.budget.bytes: expected a positive int, got -1"),
    (("objective", "candidate_bits"), [2, 7], "objective.candidate_bits[1]: expected a bit width"),
    (("extra",), {}, "plan.json: unknown top-level key \"extra\""),
])
def test_malformed_plans_are_refused_naming_the_field(plan, path, value, message):
    set_in(plan, path, value)
    with pytest.raises(PlanError, match=re.escape(message)) as error:
        validate_plan(plan)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("field", ["format", "model", "experts", "non_expert", "quantization", "pruning"])
def test_plans_missing_a_field_are_refused(plan, field):
    del plan[field]
    with pytest.raises(PlanError, match=f"plan.json: missing field \"{field}\""):
        validate_plan(plan)


def test_plan_objective_is_optional_and_counts_are_checked(plan):
    del plan["objective"]
    validate_plan(plan, num_layers=3, num_experts=4)
    with pytest.raises(PlanError, match=r"experts\.bits: expected 32 layers, got 3"):
        validate_plan(plan, num_layers=32)
    with pytest.raises(PlanError, match=r"experts\.bits\[1\]: expected 8 experts, got 4"):
        validate_plan(plan, num_experts=8)


def test_load_plan_names_the_file(tmp_path):
    path = tmp_path / "my-plan.json"
    path.write_text("[1, 2")
    with pytest.raises(PlanError, match=r"my-plan\.json: not valid JSON"):
        load_plan(path)
    path.write_text(json.dumps({"format": "moec-plan/1"}))
    with pytest.raises(PlanError, match=r"my-plan\.json: missing field \"model\""):
        load_plan(path)


junk = st.one_of(st.text(max_size=5), st.floats(allow_nan=True), st.booleans(), st.none(),
                 st.integers().filter(lambda n: n not in EXPERT_WIDTHS), st.lists(st.integers(0, 16), max_size=3))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layer=st.integers(1, 2), expert=st.integers(0, 3), value=junk)
def test_any_junk_bit_width_is_refused_naming_its_cell(plan, layer, expert, value):
    bad = copy.deepcopy(plan)
    bad["experts"]["bits"][layer][expert] = value
    with pytest.raises(PlanError) as error:
        validate_plan(bad)
    message = str(error.value)
    assert message.startswith(f"plan.json: experts.bits[{layer}][{expert}]: expected a bit width")
    assert "\n" not in message


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.text(min_size=1, max_size=12).filter(
    lambda k: k not in ("format", "model", "experts", "objective", "non_expert", "quantization", "pruning")))
def test_any_unknown_top_level_key_is_refused(plan, key):
    bad = dict(plan, **{key: 1})
    with pytest.raises(PlanError, match="unknown top-level key"):
        validate_plan(bad)


json_junk = st.recursive(
    st.none() | st.booleans() | st.text(max_size=8) | st.floats(allow_nan=True, allow_infinity=True)
    | st.integers(min_value=-(10**30), max_value=10**30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=40)  # deeply nested lists and objects of anything JSON can hold, huge numbers included


def plan_paths(tree, prefix=()):
    """Every path into a plan: object keys and list indices."""
    yield prefix
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else []
    for key, child in items:
        yield from plan_paths(child, prefix + (key,))


@pytest.fixture
def pruned_plan(plan) -> dict:
    return {**plan, "pruning": {"layers": [{"layer": 1, "beta": 0.4}, {"layer": 2, "beta": 0.6}],
                                "protect_fraction": 0.1, "target": 0.15}}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), junk=json_junk, action=st.sampled_from(["replace", "delete", "add key"]))
def test_any_corruption_of_a_plan_is_a_one_line_error_naming_the_field(pruned_plan, data, junk, action):
    """Anywhere in a plan (pruning included): a value replaced by junk, a field deleted or an
    unknown key added is either still a valid plan or a PlanError naming the top-level field
    in one line; never another exception."""
    bad = copy.deepcopy(pruned_plan)
    path = data.draw(st.sampled_from(list(plan_paths(bad))[1:]))
    parent = bad
    for key in path[:-1]:
        parent = parent[key]
    if action == "delete" and isinstance(parent, dict):
        del parent[path[-1]]
    elif action == "add key" and isinstance(parent[path[-1]], dict):
        parent[path[-1]]["zz-unknown"] = junk
    else:
        parent[path[-1]] = junk
    try:
        validate_plan(bad)
    except PlanError as error:
        message = str(error)
        assert "\n" not in message and message.startswith("plan.json")
        assert str(path[0]) in message, (path, message)


def test_non_expert_widths_can_be_overridden(mixtral_stats):
    plan = make_plan(mixtral_stats, avg_bits=2.5, scope="layer", non_expert={"attention": 8})
    assert plan["non_expert"]["attention"] == 8 and plan["non_expert"]["lm_head"] == 8
    with pytest.raises(PlanError, match="non_expert: unknown part \"router\""):
        make_plan(mixtral_stats, avg_bits=2.5, scope="layer", non_expert={"router": 8})
    with pytest.raises(PlanError, match="non_expert.attention: expected a bit width"):
        make_plan(mixtral_stats, avg_bits=2.5, scope="layer", non_expert={"attention": 5})


def test_gamma_changes_the_loss_exponent_only(mixtral_stats):
    """The paper's Eq. 4 has its own loss exponent; the released allocation needs it equal to alpha."""
    default = make_plan(mixtral_stats, avg_bits=2.5, scope="layer")
    same = make_plan(mixtral_stats, avg_bits=2.5, scope="layer", gamma=1.0)
    squared = make_plan(mixtral_stats, avg_bits=2.5, scope="layer", gamma=2.0)
    assert same["experts"]["bits"] == default["experts"]["bits"]
    assert squared["experts"]["bits"] != default["experts"]["bits"]
    assert math.isclose(squared["objective"]["predicted_loss"],
                        predicted_loss(mixtral_stats, squared["experts"]["bits"], gamma=2.0))


# ---------------------------------------------------------------- the whole budget (non-expert widths)


def with_non_expert_losses(stats: dict, seed: int, widths=(2, 4)) -> dict:
    """What `moec calibrate --non-expert` adds: attention in each layer and the embedding measured
    (losses falling with width), the head counted but not measured, and the residual stream's norm
    beside each loss and each MoE layer."""
    rng = np.random.default_rng(seed)
    layers = stats["model"]["num_layers"]
    residual = [float(rng.lognormal(3, 1)) for _ in range(layers)]
    for layer in stats["layers"]:
        if layer["experts"] is not None:
            layer["residual_norm"] = residual[layer["layer"]]
    stats["non_expert"] = {
        "attention": {"params": 4 * 64 * 64 * layers, "matrices": [[64, 64, 4 * layers]], "quant_loss": {
            str(w): [float(rng.lognormal(3, 1) * 2.0 ** -w) for _ in range(layers)] for w in widths},
            "residual_norm": residual},
        "embedding": {"params": 512 * 64, "matrices": [[512, 64, 1]],
                      "quant_loss": {str(w): [float(rng.lognormal(3, 1) * 2.0 ** -w)] for w in widths},
                      "residual_norm": [float(rng.lognormal(0, 1))]},
        "lm_head": {"params": 512 * 64, "matrices": [[512, 64, 1]]}}
    return stats


def part_bytes(part: dict, bits, group_size: int = 128) -> int:
    """A category's matrices as stored: per row whole groups of codes, a float32 scale and a packed
    zero point per group, each row's zero points padded to whole bytes."""
    total = 0
    for rows, columns, n in part["matrices"]:
        groups = math.ceil(columns / group_size)
        total += n * rows * (groups * (group_size * bits // 8 + 4) + math.ceil(groups * bits / 8))
    return total


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), budget_position=st.floats(0, 1))
def test_whole_budget_plans_find_the_brute_force_optimum(seed, budget_position):
    """With whole_budget the experts and the measured non-expert categories share one byte budget, the
    head's bytes at its given width among them, and every unit is weighed by its squared loss relative
    to the residual stream's norm where it lands (an expert's quant_loss over its layer's norm, a
    category's per-layer losses each over theirs): the plan is the best such allocation."""
    widths, params = (2, 4), 3 * 64 * 256
    stats = with_non_expert_losses(synthetic_stats(seed, num_experts=3, widths=widths), seed)
    parts = stats["non_expert"]
    experts = [(e["quant_loss"], layer["residual_norm"]) for layer in stats["layers"] for e in layer["experts"]]
    units = [[(loss[str(w)] / norm) ** 2 for w in widths] for loss, norm in experts] + \
        [[sum((v / norm) ** 2 for v, norm in zip(parts[c]["quant_loss"][str(w)], parts[c]["residual_norm"]))
          for w in widths] for c in ("attention", "embedding")]
    unit_bytes = [[expert_bytes(params, w) for w in widths]] * len(experts) + \
        [[part_bytes(parts[c], w) for w in widths] for c in ("attention", "embedding")]
    head = part_bytes(parts["lm_head"], 8)
    combos = np.array(list(itertools.product(range(len(widths)), repeat=len(units))))
    combo_cost = np.array(units)[np.arange(len(units)), combos].sum(axis=1)
    combo_bytes = np.array(unit_bytes)[np.arange(len(units)), combos].sum(axis=1) + head
    budget = int(combo_bytes.min() + budget_position * (combo_bytes.max() - combo_bytes.min()))
    plan = make_plan(stats, size_budget=budget, require_top_widths=False, params_per_expert=params, whole_budget=True)
    objective = plan["objective"]
    assert objective["predicted_loss"] == pytest.approx(combo_cost[combo_bytes <= budget].min(), rel=1e-9)
    assert (objective["frequency_exponent"], objective["weight_exponent"], objective["loss_exponent"]) == (0, 0, 2)
    chosen = [plan["experts"]["bits"][layer][e] for layer in range(2) for e in range(3)]
    expert_total = sum(expert_bytes(params, w) for w in chosen)
    non_expert = plan["non_expert"]
    assert non_expert["lm_head"] == 8 and {non_expert["attention"], non_expert["embedding"]} <= set(widths)
    assert objective["predicted_non_expert_bytes"] == head + sum(
        part_bytes(parts[c], non_expert[c]) for c in ("attention", "embedding"))
    assert objective["predicted_expert_bytes"] == expert_total
    assert expert_total + objective["predicted_non_expert_bytes"] <= budget
    from moec.policy import weight_bits

    assert weight_bits(plan, "model.layers.1.self_attn.q_proj.weight") == non_expert["attention"]


def test_whole_budget_avg_bits_keeps_the_size_of_the_plan_without_it():
    """--avg-bits B --whole-budget may spend what the experts at B and the other weights at their
    given widths would take, no more: the same file size, moved between them."""
    stats = with_non_expert_losses(synthetic_stats(4, num_experts=4, widths=(2, 4, 8)), 4, widths=(2, 4, 8))
    params = 3 * 64 * 256
    parts = stats["non_expert"]
    plain = make_plan(stats, avg_bits=3, require_top_widths=False, params_per_expert=params)
    whole = make_plan(stats, avg_bits=3, require_top_widths=False, params_per_expert=params, whole_budget=True)
    given = sum(part_bytes(parts[c], plain["non_expert"][c]) for c in parts)
    assert whole["objective"]["budget"]["bytes"] == plain["objective"]["budget"]["bytes"] + given
    assert whole["objective"]["predicted_expert_bytes"] + whole["objective"]["predicted_non_expert_bytes"] <= \
        whole["objective"]["budget"]["bytes"]
    assert "whole_budget" not in plain["objective"]


@pytest.mark.parametrize("edit, options, message", [
    (lambda s: s.pop("non_expert"), {}, "whole_budget needs the stats' non_expert losses and residual norms, "
                                        "which moec calibrate --non-expert records"),
    (lambda s: s["layers"][0].pop("residual_norm") and s["layers"][1].pop("residual_norm"), {},
     "whole_budget needs the stats' non_expert losses and residual norms"),
    (lambda s: s["layers"][0].pop("residual_norm"), {}, "stats: layers[0].residual_norm: expected a positive number"),
    (lambda s: s["non_expert"]["attention"]["residual_norm"].pop(), {},
     "stats: non_expert.attention.residual_norm: expected one norm per layer of quant_loss"),
    (lambda s: s["non_expert"]["attention"].pop("quant_loss") and s["non_expert"]["embedding"].pop("quant_loss"),
     {}, "whole_budget needs the stats' non_expert losses"),
    (lambda s: None, {"alpha": 1.0}, "whole_budget weighs every weight by the squared error it adds to the "
                                     "residual stream: exponents alpha 0, beta 0, gamma 2"),
    (lambda s: None, {"scope": "layer"}, "whole_budget needs scope \"global\""),
    (lambda s: s["non_expert"].__setitem__("router", {"params": 5}), {},
     "stats: non_expert: unknown category \"router\""),
    (lambda s: s["non_expert"]["attention"].__setitem__("params", 0), {},
     "stats: non_expert.attention.params: expected a positive int, got 0"),
    (lambda s: s["non_expert"]["attention"].__setitem__("params", 5), {},
     "stats: non_expert.attention: params 5 is not the weights its matrices hold"),
    (lambda s: s["non_expert"]["lm_head"].__setitem__("matrices", [[512, 64]]), {},
     "stats: non_expert.lm_head.matrices: expected a list of [rows, columns, how many] positive ints"),
    (lambda s: s["non_expert"]["attention"]["quant_loss"]["4"].pop(), {},
     "stats: non_expert.attention.quant_loss: expected the same non-empty list of per-layer losses"),
    (lambda s: s["non_expert"]["embedding"]["quant_loss"].__setitem__("2", [-1.0]), {},
     "stats: non_expert.embedding.quant_loss[\"2\"]: expected a finite number >= 0, got -1.0"),
])
def test_whole_budget_refusals_name_the_problem(edit, options, message):
    stats = with_non_expert_losses(synthetic_stats(5, widths=(2, 4)), 5)
    edit(stats)
    with pytest.raises(PlanError, match=re.escape(message)):
        make_plan(stats, avg_bits=3, require_top_widths=False, params_per_expert=3 * 64 * 256, whole_budget=True,
                  **options)
