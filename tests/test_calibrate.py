"""`moec calibrate`: statistics checked against transformers itself, every family, bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import moec
from moec.calibrate import calibrate
from moec.text import token_windows
from moec.checkpoint import open_checkpoint
from moec.cli import main
from moec.errors import MoecError
from moec.planner import PlanError, make_plan, save_plan
from moec.pruning import plan_pruning
from moec.quant import fake_quantize
from moec.runtime import Artifact, Tokenizer, generate
from tiny import SUPPORTED, families, save_tiny

TEXT = ("The quick brown fox jumps over the lazy dog. " * 40 +
        "def f(x):\n    return [i * x for i in range(10)]\n" * 40)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "calibration.txt"
    path.write_text(TEXT)
    return path


# Zaya's layers pass their router state to the next layer (see the test below)
@pytest.mark.parametrize("arch", families([arch for arch in SUPPORTED if arch != "zaya"]))
def test_calibrate_then_plan_every_family(arch, tmp_path, text_file, compiled):
    """Calibrate, plan mixed 2/4/8-bit widths and 0.15 dynamic pruning, compile, verify and run: the
    whole MC-MoE pipeline on every family (one compile covers the mixed plan and the pruning)."""
    model_dir = compiled(arch).model_dir
    stats = calibrate(model_dir, data=text_file, samples=6, seq_len=32, progress=False)
    assert stats["format"] == "moec-stats/1" and stats["model"]["model_type"] == arch
    moe_layers = [entry["layer"] for entry in compiled(arch).record["moe_layers"]]
    assert [layer["layer"] for layer in stats["layers"]] == moe_layers
    top_k = stats["model"]["top_k"]
    for layer in stats["layers"]:
        assert sum(e["frequency"] for e in layer["experts"]) == 6 * 32 * top_k
        for e in layer["experts"]:
            if e["frequency"]:
                loss = e["quant_loss"]
                assert loss["8"] < loss["4"] < loss["2"], (layer["layer"], loss)
            else:
                assert e["routing_weight"] == 0 and all(v == 0 for v in e["quant_loss"].values())
        curve = layer["pruning"]
        if top_k == 1:  # MC-MoE prunes a token's rank >= 2 experts: a top-1 layer has none
            assert curve["beta"] == curve["pruned_fraction"] == []
            continue
        assert len(curve["beta"]) == len(curve["pruned_fraction"]) == len(curve["relative_error"]) > 0
        # a higher beta drops more; the top-1 is never dropped
        assert np.all(np.diff(curve["pruned_fraction"]) >= 0)
        assert 0 <= curve["pruned_fraction"][0] and curve["pruned_fraction"][-1] <= (top_k - 1) / top_k
        assert curve["pruned_fraction"][-1] > 0 and curve["relative_error"][-1] > 0
    for scope in ("layer", "global"):
        plan = make_plan(stats, avg_bits=4.0, bits=[2, 4, 8], scope=scope)
        bits = plan["experts"]["bits"]
        assert [i for i, row in enumerate(bits) if row is not None] == moe_layers
        assert all(b in (2, 4, 8) for row in bits if row for b in row)
    plan["quantization"]["group_size"] = 16
    if top_k == 1:
        with pytest.raises(PlanError, match="top-k is 1"):
            plan_pruning(stats, 0.15)
    else:
        _plan_pruning(plan, stats, arch)
    save_plan(plan, tmp_path / "plan.json")
    record = moec.compile(model_dir, tmp_path / "artifact", plan=tmp_path / "plan.json", progress=False)
    check = record["verification"]
    assert check["max_abs_logit_diff"] < 1e-3  # packing and graph exact against dequantized, pruned PyTorch
    assert check["shipped_kernels"]["max_abs_logit_diff"] > 0  # int8 activations: measured, recorded
    if top_k > 1:
        assert "pruning as planned" in check["against"]
        assert {entry["layer"] for entry in record["pruning"]["layers"]} == \
            {e["layer"] for e in plan["pruning"]["layers"]}
    widths = {layer["layer"]: [e["bits"] for e in layer["experts"]] for layer in record["quantization"]["experts"]}
    assert all(row == plan["experts"]["bits"][layer] for layer, row in widths.items())
    assert len({b for row in widths.values() for b in row}) > 1, "the planner chose one width: not a mixed plan"
    assert record["bytes"]["total"] < compiled(arch).record["bytes"]["total"]
    assert len(list(generate(Artifact(tmp_path / "artifact"), [[3, 14, 15, 92]], 5))) == 5


@pytest.mark.parametrize("arch", families(["zaya"]))
def test_calibrate_refuses_layers_that_pass_more_than_hidden_states(arch, compiled, text_file):
    """Calibration replays each decoder layer from its recorded inputs; Zaya's layers also hand
    their router state to the next one, so it is refused in one line (compile takes plans as usual:
    test_mixed_plan_compiles_verifies_and_runs)."""
    with pytest.raises(MoecError) as refused:
        calibrate(compiled(arch).model_dir, data=text_file, samples=2, seq_len=16, progress=False)
    assert "\n" not in str(refused.value) and "zaya" in str(refused.value)


def _plan_pruning(plan: dict, stats: dict, arch: str) -> None:
    """Plan 0.15 dynamic pruning into `plan` (PhiMoE: what its router lets the rule reach)."""
    reach = sum(max(layer["pruning"]["pruned_fraction"]) for layer in stats["layers"]) / stats["model"]["num_layers"]
    assert (reach < 0.05) == (arch == "phimoe")
    # PhiMoE's sparsemixer gives its second expert a weight near its first's, so the beta rule drops
    # few: at most 2.6% of this model's activations
    target = 0.15 if arch != "phimoe" else 0.9 * reach
    plan["pruning"] = plan_pruning(stats, target)
    assert plan["pruning"]["layers"] and plan["pruning"]["predicted_pruned_fraction"] >= target


def _windows(model_dir, text_file, samples, seq_len):
    return torch.from_numpy(token_windows(Tokenizer(model_dir).encode(TEXT), samples, seq_len))


def test_frequencies_and_weights_match_transformers_router(compiled, text_file):
    """Counted independently from transformers' own router outputs on the same tokens."""
    c = compiled("mixtral")
    stats = calibrate(c.model_dir, data=text_file, samples=4, seq_len=32, progress=False)
    ids = _windows(c.model_dir, text_file, 4, 32)
    routers = [layer.mlp.gate for layer in c.model.model.layers]
    seen = [[] for _ in routers]
    handles = [r.register_forward_hook(lambda m, a, out, i=i: seen[i].append(out)) for i, r in enumerate(routers)]
    with torch.no_grad():
        c.model(ids)
    for h in handles:
        h.remove()
    for i, layer in enumerate(stats["layers"]):
        _, scores, indices = seen[i][0]
        frequency = torch.bincount(indices.flatten(), minlength=4).numpy()
        weight = torch.zeros(4).index_add_(0, indices.flatten(), scores.flatten()).numpy()
        assert [e["frequency"] for e in layer["experts"]] == frequency.tolist()
        np.testing.assert_allclose([e["routing_weight"] for e in layer["experts"]], weight, rtol=1e-5)


def test_quant_loss_is_the_moe_output_error_of_quantizing_that_expert(compiled, text_file):
    """Quantize one expert inside transformers' own model and measure the MoE block's output."""
    c = compiled("mixtral")
    layer, expert, bits = 1, 2, 2
    stats = calibrate(c.model_dir, data=text_file, samples=4, seq_len=32, bits=(bits,), progress=False)
    ids = _windows(c.model_dir, text_file, 4, 32)
    moe = c.model.model.layers[layer].mlp
    outputs = []
    handle = moe.register_forward_hook(lambda m, a, out: outputs.append(out))
    experts = moe.experts
    original = (experts.gate_up_proj.data.clone(), experts.down_proj.data.clone())
    try:
        with torch.no_grad():
            c.model(ids)
            experts.gate_up_proj.data[expert] = torch.from_numpy(
                fake_quantize(original[0][expert].numpy(), bits))  # gate and up rows quantize row-wise alike
            experts.down_proj.data[expert] = torch.from_numpy(fake_quantize(original[1][expert].numpy(), bits))
            c.model(ids)
    finally:
        experts.gate_up_proj.data, experts.down_proj.data = original
        handle.remove()
    expected = torch.linalg.norm(outputs[1] - outputs[0]).item()
    measured = stats["layers"][layer]["experts"][expert]["quant_loss"][str(bits)]
    assert measured == pytest.approx(expected, rel=1e-3)


def test_calibrate_peak_parameter_memory_is_about_one_layer(tmp_path, text_file, monkeypatch):
    """While calibrating, never more than one decoder layer's weights are materialized."""
    from moec import weights

    save_tiny("qwen3_moe", tmp_path)
    peak, original_load = [0], weights.StreamingModel.load

    def load(self, path):
        module = original_load(self, path)
        live = sum(p.numel() for p in self.model.parameters() if p.device.type != "meta")
        peak[0] = max(peak[0], live)
        return module

    monkeypatch.setattr(weights.StreamingModel, "load", load)
    calibrate(tmp_path, data=text_file, samples=2, seq_len=16, progress=False)
    model = weights.StreamingModel(open_checkpoint(tmp_path)).model
    largest_layer = max(sum(p.numel() for p in layer.parameters()) for layer in model.model.layers)
    embeddings = model.model.embed_tokens.weight.numel()
    assert 0 < peak[0] <= max(largest_layer, embeddings)


@pytest.mark.parametrize("content, words", [
    ("", "empty"),
    ("short text", "fewer than one sequence"),
    (b"\x00\x01\x02binary\xff", "UTF-8"),
])
def test_bad_calibration_text(capsys, tmp_path, compiled, content, words):
    data = tmp_path / "data.txt"
    data.write_bytes(content if isinstance(content, bytes) else content.encode())
    code = main(["calibrate", str(compiled("mixtral").model_dir), "--data", str(data),
                 "--seq-len", "64", "--out", str(tmp_path / "stats.json"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("moec: error:") and words in err and "\n" not in err
    assert not (tmp_path / "stats.json").exists()


def test_cli_calibrate_with_builtin_corpus_then_plan(capsys, tmp_path, compiled):
    model_dir = compiled("olmoe").model_dir
    stats_file, plan_file = tmp_path / "stats.json", tmp_path / "plan.json"
    assert main(["calibrate", str(model_dir), "--samples", "4", "--seq-len", "32", "--out", str(stats_file),
                 "--quiet"]) == 0
    stats = json.loads(stats_file.read_text())
    assert stats["calibration"]["data"] == "builtin:calibration.txt"
    assert main(["plan", "--stats", str(stats_file), "--avg-bits", "3", "--bits", "2,4,8",
                 "--model", str(model_dir), "--out", str(plan_file)]) == 0
    plan = json.loads(plan_file.read_text())
    assert plan["format"] == "moec-plan/1" and len(plan["experts"]["bits"]) == 2
    capsys.readouterr()
