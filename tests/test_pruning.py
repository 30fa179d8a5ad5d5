"""Dynamic pruning end to end: the plan's pruning section, its planner, and a pruned artifact
verified, evaluated and switched off at run time."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from moec.calibrate import calibrate
from moec.cli import main
from moec.evaluate import evaluate
from moec.planner import DEFAULT_NON_EXPERT, PlanError, save_plan, validate_plan
from moec.pruning import plan_pruning

BETAS = [0.2, 0.4, 0.6, 0.8]


def curve_stats(curves: list[tuple[list[float], list[float]]]) -> dict:
    """Stats whose layers carry only the pruning curves (what plan_pruning reads)."""
    return {"layers": [{"layer": i, "pruning": {"beta": BETAS, "pruned_fraction": fractions,
                                                "relative_error": errors}}
                       for i, (fractions, errors) in enumerate(curves)]}


def brute_force(stats: dict, target: float) -> float:
    """Least sum of squared errors over every choice of one beta (or none) per layer."""
    options = [[(0.0, 0.0)] + list(zip(layer["pruning"]["pruned_fraction"], layer["pruning"]["relative_error"]))
               for layer in stats["layers"]]
    best = np.inf
    for choice in itertools.product(*options):
        if sum(f for f, _ in choice) / len(options) >= target - 1e-12:
            best = min(best, sum(e ** 2 for _, e in choice))
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("target", [0.05, 0.15, 0.3])
def test_planner_finds_the_least_error_choice(seed, target):
    rng = np.random.default_rng(seed)
    curves = []
    for _ in range(3):
        fractions = np.sort(rng.uniform(0, 0.5, len(BETAS)))
        curves.append((fractions.tolist(), (fractions * rng.uniform(0.2, 2.0)).tolist()))
    stats = curve_stats(curves)
    pruning = plan_pruning(stats, target)
    chosen = {entry["layer"]: BETAS.index(entry["beta"]) for entry in pruning["layers"]}
    removed = sum(curves[layer][0][j] for layer, j in chosen.items()) / len(curves)
    error = sum(curves[layer][1][j] ** 2 for layer, j in chosen.items())
    assert removed >= target - 1e-9 and pruning["predicted_pruned_fraction"] == pytest.approx(removed)
    assert error == pytest.approx(brute_force(stats, target), rel=1e-9, abs=1e-12)


def test_planner_prefers_the_insensitive_layer_and_scales_for_protection():
    stats = curve_stats([([0.1, 0.2, 0.3, 0.4], [0.5, 1.0, 1.5, 2.0]), ([0.1, 0.2, 0.3, 0.4], [0.05, 0.1, 0.15, 0.2])])
    assert plan_pruning(stats, 0.1)["layers"] == [{"layer": 1, "beta": 0.4}]
    protected = plan_pruning(stats, 0.1, protect_fraction=0.6)
    assert protected["predicted_pruned_fraction"] >= 0.1 and protected["protect_fraction"] == 0.6
    assert {entry["layer"] for entry in protected["layers"]} == {0, 1}  # 60% of the tokens are exempt


def test_the_top_p_rule_is_planned_from_its_own_curves():
    """--prune-rule top-p: one p per layer from the top_p curves, the same least-error choice."""
    stats = curve_stats([([0.1, 0.2, 0.3, 0.4], [0.5, 1.0, 1.5, 2.0]), ([0.1, 0.2, 0.3, 0.4], [0.05, 0.1, 0.15, 0.2])])
    for layer in stats["layers"]:  # top-p: a lower p drops more
        layer["pruning"]["top_p"] = {"top_p": [0.9, 0.7, 0.5, 0.3], "pruned_fraction": [0.05, 0.1, 0.2, 0.3],
                                     "relative_error": [0.3, 0.6, 0.9, 1.2] if layer["layer"] else
                                     [0.01, 0.02, 0.03, 0.04]}
    pruning = plan_pruning(stats, 0.1, rule="top_p")
    assert pruning["layers"] == [{"layer": 0, "top_p": 0.5}] and pruning["predicted_pruned_fraction"] == 0.1
    assert plan_pruning(stats, 0.1)["layers"] == [{"layer": 1, "beta": 0.4}]  # the beta curves disagree
    del stats["layers"][0]["pruning"]["top_p"], stats["layers"][1]["pruning"]["top_p"]
    with pytest.raises(PlanError, match="no top_p pruning curves"):
        plan_pruning(stats, 0.1, rule="top_p")


@pytest.mark.parametrize("target, protect, message", [
    (0.0, 0.0, "--prune-target must be a fraction"),
    (1.5, 0.0, "--prune-target must be a fraction"),
    (0.1, 1.0, "--protect-fraction must be in [0, 1)"),
    (0.45, 0.0, "out of reach"),
])
def test_planner_refuses_bad_targets(target, protect, message):
    stats = curve_stats([([0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4])])
    with pytest.raises(PlanError, match=message.replace("[", r"\[").replace(")", r"\)")):
        plan_pruning(stats, target, protect)


def test_stats_without_curves_are_refused():
    with pytest.raises(PlanError, match="run moec calibrate again"):
        plan_pruning({"layers": [{"layer": 0, "pruning": {"beta": [], "pruned_fraction": [], "relative_error": []}}]},
                     0.1)


def float_plan(layers: int, experts: int, pruning: dict) -> dict:
    return {"format": "moec-plan/1", "model": None, "experts": {"bits": [["float"] * experts] * layers},
            "non_expert": {key: "float" for key in DEFAULT_NON_EXPERT},
            "quantization": {"method": "rtn", "group_size": 32}, "pruning": pruning}


@pytest.mark.parametrize("pruning, message", [
    ({"layers": []}, 'missing field "protect_fraction"'),
    ({"layers": [{"layer": 0, "beta": 1.5}], "protect_fraction": 0.0}, "beta: expected a number in (0, 1]"),
    ({"layers": [{"layer": 0, "beta": 0.0}], "protect_fraction": 0.0}, "beta: expected a number in (0, 1]"),
    ({"layers": [{"layer": 0, "beta": 0.5}, {"layer": 0, "beta": 0.3}], "protect_fraction": 0.0},
     "layers[1].layer: expected a layer index not listed before"),
    ({"layers": [{"layer": 0}], "protect_fraction": 0.0}, "layers[0]: expected"),
    ({"layers": [], "protect_fraction": 1.0}, "protect_fraction: expected a number in [0, 1)"),
    ({"layers": [], "protect_fraction": 0.0, "beta": 0.3}, 'unknown key "beta"'),
    ({"layers": [{"layer": 0, "top_p": 0.0}], "protect_fraction": 0.0}, "top_p: expected a number in (0, 1]"),
    ({"layers": [{"layer": 0, "top_p": 0.5, "beta": 0.5}], "protect_fraction": 0.0}, "layers[0]: expected"),
    ({"layers": [{"layer": 0, "top-p": 0.5}], "protect_fraction": 0.0}, "layers[0]: expected"),
])
def test_bad_pruning_sections_are_refused_naming_the_field(pruning, message):
    with pytest.raises(PlanError) as error:
        validate_plan(float_plan(2, 4, pruning))
    assert message in str(error.value) and "pruning" in str(error.value)


def _pruned(model, tmp_path_factory):
    """A family's tiny model (a conftest Compiled) with its layer 1 pruned at beta 0.9, in float:
    (artifact, model_dir, text)."""
    import moec

    root = tmp_path_factory.mktemp("pruned")
    rows = [None] * model.model.config.num_hidden_layers
    for layer in model.record["moe_layers"]:
        rows[layer["layer"]] = ["float"] * layer["num_experts"]
    plan = root / "plan.json"
    save_plan({**float_plan(0, 0, {"layers": [{"layer": 1, "beta": 0.9}], "protect_fraction": 0.0}),
               "experts": {"bits": rows}}, plan)
    moec.compile(model.model_dir, root / "artifact", plan=plan, progress=False)
    text = root / "text.txt"
    text.write_text("def pruned(x):\n    return [y * 2 for y in x if y]\n" * 40)
    return root / "artifact", model.model_dir, text


@pytest.fixture(scope="module")
def pruned(compiled, tmp_path_factory):
    """The tiny Mixtral with its layer 1 (of 2) pruned at beta 0.9, in float: (artifact, model_dir, text)."""
    return _pruned(compiled("mixtral"), tmp_path_factory)


@pytest.fixture(scope="module")
def pruned_of(compiled, tmp_path_factory):
    """pruned_of(arch): `pruned` of another family, made once."""
    made = {}
    return lambda arch: made.get(arch) or made.setdefault(arch, _pruned(compiled(arch), tmp_path_factory))


# Ergo's experts module routes for itself (the experts interface once per route, top-1 at weight 1,
# each route normed by its expert before its routing weight): its pruning is a moec::Routes node on
# the module's own routing (moec.ops.routes). Its layer 0 is dense, 1 and 2 have top-2 experts.
@pytest.mark.parametrize("arch", ["mixtral", "ergo"])
def test_pruned_artifact_is_verified_against_the_pruned_reference(arch, pruned_of):
    artifact, _, _ = pruned_of(arch)
    record = json.loads((artifact / "moec.json").read_text())
    assert record["verification"]["max_abs_logit_diff"] < 1e-4
    assert "pruned layers" in record["verification"]["against"]
    assert record["pruning"]["layers"] == [{"layer": 1, "beta": 0.9}] and "L1 norm" in record["pruning"]["importance"]


@pytest.mark.parametrize("arch", ["mixtral", "ergo"])
def test_eval_counts_pruned_activations_and_the_switch_restores_the_model(arch, pruned_of):
    artifact, model_dir, text = pruned_of(arch)
    on = evaluate(artifact, text, samples=4, seq_len=32)
    off = evaluate(artifact, text, samples=4, seq_len=32, prune=False)
    model = evaluate(model_dir, text, samples=4, seq_len=32)
    # layer 1 of 2 prunes: at most half of the second experts of its tokens go
    assert 0 < on["pruned_fraction"] <= 0.25 and on["expert_activations"] < on["top_k_activations"]
    assert on["top_k_activations"] == 2 * 2 * 4 * 32  # MoE layers x top-k x tokens
    assert off["pruned_fraction"] == 0 and off["expert_activations"] == off["top_k_activations"]
    assert off["perplexity"] == pytest.approx(model["perplexity"], rel=1e-5)
    assert on["perplexity"] != pytest.approx(off["perplexity"], rel=1e-6)


def test_cli_plans_pruning_and_runs_without_it(capsys, pruned, tmp_path):
    artifact, model_dir, text = pruned
    stats = calibrate(model_dir, data=text, samples=4, seq_len=32, progress=False)
    stats_file = tmp_path / "stats.json"
    stats_file.write_text(json.dumps(stats))
    plan = tmp_path / "plan.json"
    assert main(["plan", "--stats", str(stats_file), "--avg-bits", "4", "--bits", "2,4,8", "--group-size", "32",
                 "--prune-target", "0.1", "--out", str(plan)]) == 0
    assert "pruning" in capsys.readouterr().out
    section = json.loads(plan.read_text())["pruning"]
    assert section["target"] == 0.1 and section["predicted_pruned_fraction"] >= 0.1 and section["layers"]
    for flag in ([], ["--no-prune"]):
        assert main(["eval", str(artifact), "--data", str(text), "--samples", "2", "--seq-len", "16", "--json",
                     *flag]) == 0
        result = json.loads(capsys.readouterr().out)
        assert (result["pruned_fraction"] > 0) == (not flag)
    assert main(["run", str(artifact), "--prompt", "def ", "--max-new-tokens", "4", "--no-prune", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["generated_ids"]) == 4
    assert main(["plan", "--stats", str(stats_file), "--avg-bits", "4", "--bits", "2,4,8", "--group-size", "32",
                 "--prune-target", "0.9", "--out", str(tmp_path / "no.json")]) == 2
    assert "out of reach" in capsys.readouterr().err
    assert not (tmp_path / "no.json").exists()


def test_cli_calibrates_dropping_and_plans_top_p_pruning_with_dropped_experts(capsys, pruned, tmp_path):
    """`moec calibrate --bits 0,2,4,8`, then `moec plan --bits 0,2,4,8 --prune-rule top-p`: some
    experts dropped under the byte budget, the super experts kept, top-p thresholds per layer."""
    _, model_dir, text = pruned
    stats_file = tmp_path / "stats.json"
    assert main(["calibrate", str(model_dir), "--data", str(text), "--samples", "4", "--seq-len", "32",
                 "--bits", "0,2,4,8", "--out", str(stats_file), "--quiet"]) == 0
    capsys.readouterr()
    plan = tmp_path / "plan.json"
    assert main(["plan", "--stats", str(stats_file), "--avg-bits", "2", "--bits", "0,2,4,8", "--group-size", "32",
                 "--no-top-widths", "--prune-target", "0.1", "--prune-rule", "top-p", "--out", str(plan)]) == 0
    out = capsys.readouterr().out
    written = json.loads(plan.read_text())
    dropped = sum(row.count(0) for row in written["experts"]["bits"] if row)
    assert dropped > 0 and f"{dropped} experts dropped" in out and "super experts kept at 8 bits" in out
    assert all("top_p" in entry for entry in written["pruning"]["layers"]) and written["pruning"]["layers"]
    assert main(["plan", "--stats", str(stats_file), "--avg-bits", "2", "--prune-rule", "top-p",
                 "--out", str(tmp_path / "no.json")]) == 2
    assert "--prune-rule need --prune-target" in capsys.readouterr().err


def test_pruning_a_layer_without_experts_is_refused(compiled, tmp_path):
    import moec
    from moec.errors import MoecError

    plan = tmp_path / "plan.json"
    save_plan(float_plan(2, 4, {"layers": [{"layer": 5, "beta": 0.5}], "protect_fraction": 0.0}), plan)
    with pytest.raises(MoecError, match="names layer 5, which has no routed experts"):
        moec.compile(compiled("mixtral").model_dir, tmp_path / "out", plan=plan, progress=False)
    assert not (tmp_path / "out").exists()
