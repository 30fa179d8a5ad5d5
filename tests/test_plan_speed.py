"""A decode-speed budget: `moec profile` times a host, the planner keeps a plan's predicted step under it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moec.planner import PlanError, make_plan
from test_planner import synthetic_stats

WIDTHS = (2, 3, 4, 8)
SECONDS = {2: 1.0e-4, 3: 1.6e-4, 4: 1.7e-4, 8: 3.0e-4}  # a routed expert's token at each width
OTHER = 2e-3


def profile_for(stats: dict, seconds=SECONDS, other=OTHER) -> dict:
    return {"format": "moec-profile/1", "other_seconds": other,
            "layers": [{"layer": layer["layer"], "num_experts": len(layer["experts"]), "top_k": stats["model"]["top_k"],
                        "expert_seconds": {str(b): t for b, t in seconds.items()}}
                       for layer in stats["layers"] if layer["experts"] is not None]}


def step(stats: dict, plan: dict, seconds=SECONDS, other=OTHER) -> float:
    """The predicted step, from the formula: other + per layer top_k * sum_e f_e t(b_e), f normalized."""
    total = other
    for layer, bits in zip(stats["layers"], plan["experts"]["bits"]):
        if bits is None:
            continue
        f = np.array([e["frequency"] for e in layer["experts"]])
        total += stats["model"]["top_k"] * float((f / f.sum()) @ np.array([seconds[b] for b in bits]))
    return total


@pytest.fixture
def stats():
    return synthetic_stats(3, num_layers=3, num_experts=6, widths=WIDTHS, dense_layers=(0,), hidden_size=64,
                           moe_intermediate_size=32)


def test_a_decode_budget_holds_and_costs_loss_as_it_tightens(stats):
    profile = profile_for(stats)
    slowest, fastest = 1 / step_of_widths(stats, 8), 1 / step_of_widths(stats, 2)
    losses = []
    for speed in np.linspace(slowest, fastest, 6):
        plan = make_plan(stats, decode_tok_s=float(speed), profile=profile, bits=list(WIDTHS),
                         require_top_widths=False)
        objective = plan["objective"]
        assert objective["decode_tok_s"] == pytest.approx(speed)
        assert objective["predicted_decode_tok_s"] == pytest.approx(1 / step(stats, plan))
        assert objective["predicted_decode_tok_s"] >= speed * (1 - 1e-9)
        losses.append(objective["predicted_loss"])
    assert losses == sorted(losses) and losses[0] < losses[-1]  # faster costs loss
    unbounded = make_plan(stats, decode_tok_s=slowest, profile=profile, bits=list(WIDTHS), require_top_widths=False)
    assert all(b == 8 for row in unbounded["experts"]["bits"] if row for b in row)


def step_of_widths(stats: dict, width: int) -> float:
    return step(stats, {"experts": {"bits": [None if layer["experts"] is None else [width] * len(layer["experts"])
                                             for layer in stats["layers"]]}})


def test_a_decode_budget_beside_a_byte_budget_meets_both(stats):
    profile = profile_for(stats)
    bytes_only = make_plan(stats, avg_bits=4, profile=profile, require_top_widths=False)
    speed = bytes_only["objective"]["predicted_decode_tok_s"] * 1.05
    both = make_plan(stats, avg_bits=4, decode_tok_s=speed, profile=profile, require_top_widths=False)
    assert both["objective"]["predicted_decode_tok_s"] >= speed * (1 - 1e-9)
    assert both["objective"]["predicted_expert_bytes"] <= both["objective"]["budget"]["bytes"]
    assert both["objective"]["predicted_loss"] >= bytes_only["objective"]["predicted_loss"]


def test_an_unreachable_budget_names_the_fastest_speed(stats):
    fastest = 1 / step_of_widths(stats, 2)
    with pytest.raises(PlanError, match=f"decodes at {fastest:.4g} tok/s"):
        make_plan(stats, decode_tok_s=fastest * 1.01, profile=profile_for(stats), require_top_widths=False)


def test_a_profile_of_another_model_or_width_is_refused(stats):
    with pytest.raises(PlanError, match="needs the host's profile"):
        make_plan(stats, decode_tok_s=100.0)
    other = synthetic_stats(3, num_layers=2, num_experts=6, widths=WIDTHS)
    with pytest.raises(PlanError, match="are not the stats'"):
        make_plan(stats, decode_tok_s=100.0, profile=profile_for(other))
    with pytest.raises(PlanError, match="no time for width 3"):
        make_plan(stats, decode_tok_s=100.0, profile=profile_for(stats, {2: 1e-4, 4: 2e-4, 8: 3e-4}))


def test_plan_cli_needs_a_budget_and_a_profile_for_a_speed(tmp_path, stats, capsys):
    from moec.cli import main

    (tmp_path / "stats.json").write_text(json.dumps(stats))
    (tmp_path / "profile.json").write_text(json.dumps(profile_for(stats)))
    for args, message in ((["--decode-tok-s", "100"], "--decode-tok-s needs --profile"),
                          ([], "give a budget")):
        code = main(["plan", "--stats", str(tmp_path / "stats.json"), "--out", str(tmp_path / "plan.json"), *args])
        assert code != 0 and message in capsys.readouterr().err
    assert not (tmp_path / "plan.json").exists()
    speed = 0.5 / step_of_widths(stats, 2) + 0.5 / step_of_widths(stats, 8)
    assert main(["plan", "--stats", str(tmp_path / "stats.json"), "--profile", str(tmp_path / "profile.json"),
                 "--decode-tok-s", f"{speed}", "--no-top-widths", "--out", str(tmp_path / "plan.json")]) == 0
    assert "predicted decode" in capsys.readouterr().out
    assert json.loads((tmp_path / "plan.json").read_text())["objective"]["predicted_decode_tok_s"] >= speed * 0.999


def test_profile_times_every_width_of_an_artifacts_shape(sample_artifact, tmp_path):
    """On the bundled sample (float experts): each width a positive time, the step at least its rest."""
    from moec.cli import main

    assert main(["profile", str(sample_artifact), "--bits", "2,4", "--runs", "3", "--quiet", "--out",
                 str(tmp_path / "profile.json")]) == 0
    profile = json.loads((tmp_path / "profile.json").read_text())
    assert profile["format"] == "moec-profile/1" and profile["target"] == "cpu"
    record = json.loads((sample_artifact / "moec.json").read_text())
    assert [entry["layer"] for entry in profile["layers"]] == [entry["layer"] for entry in record["moe_layers"]]
    for entry in profile["layers"]:
        assert set(entry["expert_seconds"]) == {"2", "4", "float"}
        assert all(t > 0 for t in entry["expert_seconds"].values())
    assert profile["step_seconds"] >= profile["other_seconds"] >= 0
