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


@pytest.mark.parametrize("arch", families())
def test_calibrate_then_plan_every_family(arch, tmp_path, text_file, compiled, monkeypatch):
    """Calibrate, plan mixed 2/4/8-bit widths and 0.15 dynamic pruning (beta in some layers, top-p in
    others) with a super expert kept and an expert dropped, compile, verify and run: the whole
    pipeline on every family (one compile covers all of it). Every layer hands its 2-, 4- and
    8-bit experts to QMoE where it can express them (the CPU target does so only in layers of many
    experts), so the verification covers that lowering in each family."""
    import moec.targets.cpu

    monkeypatch.setattr(moec.targets.cpu, "QMOE_MIN_EXPERTS", 0)
    model_dir = compiled(arch).model_dir
    stats = calibrate(model_dir, data=text_file, samples=6, seq_len=32, bits=(0, 2, 4, 8), progress=False)
    assert stats["format"] == "moec-stats/1" and stats["model"]["model_type"] == arch
    moe_layers = [entry["layer"] for entry in compiled(arch).record["moe_layers"]]
    assert [layer["layer"] for layer in stats["layers"]] == moe_layers
    top_k = stats["model"]["top_k"]
    passes = {1: 2} if arch == "inkling2_loop_text" else {}  # its loop layer runs twice per token
    # DeepSeek-V4's hash-routed layers read their experts from a table: none of theirs can be dropped
    hashed = [i for i, kind in enumerate(getattr(compiled(arch).model.config, "mlp_layer_types", None) or [])
              if kind == "hash_moe"]
    assert bool(hashed) == (arch == "deepseek_v4")
    for layer in stats["layers"]:
        routes = sum(e["frequency"] for e in layer["experts"])
        expected = 6 * 32 * top_k * passes.get(layer["layer"], 1)
        # LongCat-Flash's routes to its zero-computation experts reach real experts at weight 0: not counted
        assert routes == expected or arch == "longcat_flash" and 0 < routes < expected
        for e in layer["experts"]:
            if e["frequency"]:
                loss = e["quant_loss"]
                assert loss["8"] < loss["4"] < loss["2"], (layer["layer"], loss)
                assert (loss["0"] is None if layer["layer"] in hashed else loss["0"] > 0)  # dropping reroutes
                assert e["max_down_output"] > 0
            else:
                assert e["routing_weight"] == 0 and all(not v for v in e["quant_loss"].values())
        curve = layer["pruning"]
        if top_k == 1:  # MC-MoE prunes a token's rank >= 2 experts: a top-1 layer has none
            assert curve["beta"] == curve["pruned_fraction"] == []
            continue
        assert len(curve["beta"]) == len(curve["pruned_fraction"]) == len(curve["relative_error"]) > 0
        # a higher beta drops more; the top-1 is never dropped
        assert np.all(np.diff(curve["pruned_fraction"]) >= 0)
        assert 0 <= curve["pruned_fraction"][0] and curve["pruned_fraction"][-1] <= (top_k - 1) / top_k
        assert curve["pruned_fraction"][-1] > 0 and curve["relative_error"][-1] > 0
        top_p = curve["top_p"]  # a lower p keeps fewer experts
        assert np.all(np.diff(top_p["pruned_fraction"]) <= 0) and top_p["pruned_fraction"][0] > 0
    peaks = [e["max_down_output"] for layer in stats["layers"] for e in layer["experts"]]
    assert all(e["max_down_output"] > 0.1 * max(peaks) and layer["layer"] < 0.75 * stats["model"]["num_layers"]
               for layer in stats["layers"] for i, e in enumerate(layer["experts"])
               if [layer["layer"], i] in stats["super_experts"])
    for scope in ("layer", "global"):
        plan = make_plan(stats, avg_bits=4.0, bits=[2, 4, 8], scope=scope)
        bits = plan["experts"]["bits"]
        assert [i for i, row in enumerate(bits) if row is not None] == moe_layers
        assert all(b in (2, 4, 8) for row in bits if row for b in row)
    plan["quantization"]["group_size"] = 16
    assert plan["super_experts"] == stats["super_experts"]
    assert make_plan(stats, avg_bits=4.0, bits=[2, 4, 8], per_projection=True)["experts"]["down_bits"]
    assert all(plan["experts"]["bits"][layer][e] == 8 for layer, e in plan["super_experts"])
    plan["super_experts"] = plan["super_experts"] or [[moe_layers[0], 0]]  # one at least, for pruning to keep
    # the last layer's least used expert dropped (its width 0), unless that leaves fewer than top-k
    last = stats["layers"][-1]
    dropped = [last["layer"], int(np.argmin([e["frequency"] for e in last["experts"]]))]
    if stats["model"]["num_experts"] > top_k and dropped not in plan["super_experts"]:
        plan["experts"]["bits"][dropped[0]][dropped[1]] = 0
    else:
        dropped = None
    # the first layer's first expert that is neither dropped nor super: down_proj at another width
    split = next([moe_layers[0], e] for e in range(stats["model"]["num_experts"])
                 if [moe_layers[0], e] not in plan["super_experts"] + [dropped])
    plan["experts"]["down_bits"] = [None if row is None else list(row) for row in plan["experts"]["bits"]]
    split_bits = 8 if plan["experts"]["bits"][split[0]][split[1]] < 8 else 2
    plan["experts"]["down_bits"][split[0]][split[1]] = split_bits
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
        assert record["pruning"]["layers"] == plan["pruning"]["layers"]
    assert record["super_experts"] == plan["super_experts"]
    assert record["dropped_experts"] == ([dropped] if dropped else [])
    if dropped:  # no weights for it
        import onnx

        graph = onnx.load(str(tmp_path / "artifact" / "model.onnx"), load_external_data=False).graph
        names = {i.name for i in graph.initializer}
        assert not any(n.startswith(f"layers.{dropped[0]}.experts.{dropped[1]}.") for n in names)
        assert any(n.startswith(f"layers.{dropped[0]}.experts.") for n in names)
    widths = {layer["layer"]: [e["bits"] for e in layer["experts"]] for layer in record["quantization"]["experts"]}
    assert all(row == plan["experts"]["bits"][layer] for layer, row in widths.items())
    downs = {(layer["layer"], e): x["down_bits"] for layer in record["quantization"]["experts"]
             for e, x in enumerate(layer["experts"]) if "down_bits" in x}
    assert downs == {tuple(split): split_bits}  # and it verified (above): down_proj at its own width
    assert len({b for row in widths.values() for b in row}) > 1, "the planner chose one width: not a mixed plan"
    spec = compiled(arch).record["moe_layers"][0]["experts"]
    fusable = spec.get("activation", "silu") in ("silu", "clamped_swiglu") and spec.get("gate") != "none"
    assert (record["quantization"]["kernels"]["com.microsoft.QMoE"] > 0) == fusable, record["quantization"]["kernels"]
    assert record["bytes"]["total"] < compiled(arch).record["bytes"]["total"]
    assert len(list(generate(Artifact(tmp_path / "artifact"), [[3, 14, 15, 92]], 5))) == 5


@pytest.mark.parametrize("arch", families([arch for arch in ("zaya", "glm_moe_dsa", "hy_v4", "inkling2_loop_text")
                                            if arch in SUPPORTED]))
def test_layers_that_hand_on_more_than_hidden_states_calibrate_as_the_model_routes(arch, compiled, text_file):
    """Calibration replays each decoder layer from its recorded inputs; Zaya's layers also hand their
    router state to the next one, GLM-MoE-DSA's and HY-V4's their indexer's top-k (which a "shared"
    indexer layer reuses). The replay gives each layer what the one before handed on. Inkling2-Loop's
    body runs its loop layer twice per token, the second pass on messages from the first: calibration
    runs that body as it is. Every expert's token count equals that of transformers' own forward on
    the same tokens."""
    from moec.experts import call_arguments, experts_layers

    c = compiled(arch)
    stats = calibrate(c.model_dir, data=text_file, samples=4, seq_len=32, progress=False)
    routed = {}
    handles = [c.model.get_submodule(layer.path).register_forward_pre_hook(
        lambda _, args, kwargs, layer=layer.layer: routed.setdefault(layer, []).append(call_arguments(args, kwargs)[1]),
        with_kwargs=True) for layer in experts_layers(c.model)]
    with torch.no_grad():
        c.model(_windows(c.model_dir, text_file, 4, 32))
    for handle in handles:
        handle.remove()
    assert [layer["layer"] for layer in stats["layers"]] == sorted(routed)
    for layer in stats["layers"]:
        indices = torch.cat([calls.flatten() for calls in routed[layer["layer"]]])
        counts = torch.bincount(indices[indices < len(layer["experts"])], minlength=len(layer["experts"]))
        assert [e["frequency"] for e in layer["experts"]] == counts.tolist(), layer["layer"]


def _plan_pruning(plan: dict, stats: dict, arch: str) -> None:
    """Plan 0.15 dynamic pruning into `plan` (PhiMoE: what its router lets the beta rule reach), the
    beta rule's choice in every other layer, top-p's (planned for the same target) in the rest."""
    def target(curve):
        reach = sum(max(curve(layer)["pruned_fraction"]) for layer in stats["layers"]) / stats["model"]["num_layers"]
        assert (reach < 0.05) == (arch == "phimoe")
        # PhiMoE's sparsemixer mostly gives its second expert the weight of its first, so neither rule
        # drops it: at most 2.6% of this model's activations
        return 0.15 if arch != "phimoe" else 0.9 * reach

    beta_target, top_p_target = target(lambda layer: layer["pruning"]), target(lambda layer: layer["pruning"]["top_p"])
    plan["pruning"] = plan_pruning(stats, beta_target)
    assert plan["pruning"]["layers"] and plan["pruning"]["predicted_pruned_fraction"] >= beta_target
    top_p = plan_pruning(stats, top_p_target, rule="top_p")
    assert top_p["predicted_pruned_fraction"] >= top_p_target
    by_rule = [{layer["layer"]: layer for layer in rule["layers"]} for rule in (plan["pruning"], top_p)]
    layers = sorted(set(by_rule[0]) | set(by_rule[1]))
    plan["pruning"]["layers"] = [by_rule[i % 2].get(layer) or by_rule[1 - i % 2][layer]
                                 for i, layer in enumerate(layers)]
    assert {rule for layer in plan["pruning"]["layers"] for rule in layer if rule != "layer"} == {"beta", "top_p"} \
        or len(layers) == 1


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


@pytest.fixture(scope="module")
def two_bit_stats(compiled, text_file):
    return calibrate(compiled("mixtral").model_dir, data=text_file, samples=4, seq_len=32, bits=(2,), progress=False)


@pytest.mark.parametrize("part", ["whole", "gate_up", "down"])
def test_quant_loss_is_the_moe_output_error_of_quantizing_that_expert(compiled, text_file, two_bit_stats, part):
    """Quantize one expert (or only its gate and up, or only its down: projection_loss) inside
    transformers' own model and measure the MoE block's output."""
    c = compiled("mixtral")
    layer, expert, bits = 1, 2, 2
    stats = two_bit_stats
    ids = _windows(c.model_dir, text_file, 4, 32)
    moe = c.model.model.layers[layer].mlp
    outputs = []
    handle = moe.register_forward_hook(lambda m, a, out: outputs.append(out))
    experts = moe.experts
    original = (experts.gate_up_proj.data.clone(), experts.down_proj.data.clone())
    try:
        with torch.no_grad():
            c.model(ids)
            if part != "down":  # gate and up rows quantize row-wise alike
                experts.gate_up_proj.data[expert] = torch.from_numpy(fake_quantize(original[0][expert].numpy(), bits))
            if part != "gate_up":
                experts.down_proj.data[expert] = torch.from_numpy(fake_quantize(original[1][expert].numpy(), bits))
            c.model(ids)
    finally:
        experts.gate_up_proj.data, experts.down_proj.data = original
        handle.remove()
    expected = torch.linalg.norm(outputs[1] - outputs[0]).item()
    entry = stats["layers"][layer]["experts"][expert]
    measured = entry["quant_loss"] if part == "whole" else entry["projection_loss"][part]
    assert measured[str(bits)] == pytest.approx(expected, rel=1e-3)



@pytest.fixture(scope="module")
def non_expert_stats(compiled, text_file):
    return calibrate(compiled("qwen2_moe").model_dir, data=text_file, samples=4, seq_len=32, bits=(2, 4),
                     group_size=32, non_expert=True, progress=False)


@pytest.mark.parametrize("category, layer", [("attention", 1), ("shared_expert", 2), ("dense_mlp", 1),
                                             ("embedding", 0)])
def test_non_expert_loss_is_the_layer_output_error_of_quantizing_that_part(compiled, text_file, non_expert_stats,
                                                                           category, layer):
    """`--non-expert`: quantize one layer's attention, shared expert or dense MLP inside transformers'
    own model (Qwen2-MoE: layer 1 dense) and measure that layer's output; the embedding table, and
    the first layer's input."""
    from moec.policy import weight_category

    c = compiled("qwen2_moe")
    ids = _windows(c.model_dir, text_file, 4, 32)
    blocks = [f"model.layers.{i}.mlp" for i in (0, 2)]
    decoder = c.model.model.layers[layer]
    seen = []
    if category == "embedding":
        handle = decoder.register_forward_pre_hook(lambda m, args, kwargs: seen.append(args[0] if args else
                                                                                       kwargs["hidden_states"]),
                                                   with_kwargs=True)
        members = {"model.embed_tokens.weight": c.model.model.embed_tokens}
    else:
        handle = decoder.register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
        members = {f"model.layers.{layer}.{name}.weight": module for name, module in decoder.named_modules()
                   if isinstance(module, torch.nn.Linear)}
        members = {name: m for name, m in members.items() if weight_category(name, blocks) == category}
    assert members
    originals = {name: m.weight.data.clone() for name, m in members.items()}
    losses = []
    try:
        with torch.no_grad():
            c.model(ids)
            for bits in (2, 4):
                for name, m in members.items():
                    m.weight.data = torch.from_numpy(fake_quantize(originals[name].numpy(), bits, 32))
                c.model(ids)
                losses.append(torch.linalg.norm(seen[-1] - seen[0]).item())
    finally:
        for name, m in members.items():
            m.weight.data = originals[name]
        handle.remove()
    part = non_expert_stats["non_expert"][category]
    row = layer if category in ("attention", "embedding") else [0, 2].index(layer) if category == "shared_expert" else 0
    assert [part["quant_loss"][str(bits)][row] for bits in (2, 4)] == pytest.approx(losses, rel=1e-3)
    # where the error lands: the layer's output (the first layer's input for the table), as in each MoE layer's entry
    assert part["residual_norm"][row] == pytest.approx(torch.linalg.norm(seen[0]).item(), rel=1e-4)
    moe_layer = next((entry for entry in non_expert_stats["layers"] if entry["layer"] == layer), None)
    if moe_layer is not None and category != "embedding":
        assert moe_layer["residual_norm"] == part["residual_norm"][row]
    assert losses[0] > losses[1] > 0
    shapes = [tuple(m.weight.shape) for name, m in c.model.named_modules()
              if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)) and
              weight_category(f"{name}.weight", blocks) == category]
    assert part["params"] == sum(rows * columns for rows, columns in shapes)
    assert sorted(part["matrices"]) == sorted([*shape, shapes.count(shape)] for shape in set(shapes))
    assert non_expert_stats["non_expert"]["lm_head"] == {"params": c.model.lm_head.weight.numel(),
                                                         "matrices": [[*c.model.lm_head.weight.shape, 1]]}


def test_whole_budget_plan_from_calibration_compiles_verified_at_its_predicted_size(compiled, non_expert_stats,
                                                                                    tmp_path):
    """A --whole-budget plan's non-expert widths are what compile quantizes, the bytes it predicted
    for them are what the artifact stores (groups of 16: each row's zero points fill whole bytes, as at
    any real model's dims), and the artifact verifies."""
    from moec.policy import weight_category

    c = compiled("qwen2_moe")
    plan = make_plan(non_expert_stats, avg_bits=3, group_size=16, require_top_widths=False, whole_budget=True,
                     non_expert={"attention": 8, "embedding": 2})
    save_plan(plan, tmp_path / "plan.json")
    record = moec.compile(c.model_dir, tmp_path / "artifact", plan=tmp_path / "plan.json", progress=False)
    assert record["verification"]["max_abs_logit_diff"] < 1e-3
    stored = record["quantization"]["non_expert"]
    blocks = [f"model.layers.{i}.mlp" for i in (0, 2)]
    assert {weight_category(name, blocks) for name in stored} == \
        {"attention", "shared_expert", "dense_mlp", "embedding", "lm_head"}
    for name, weight in stored.items():
        assert weight["bits"] == plan["non_expert"][weight_category(name, blocks)], name
    assert sum(weight["bytes"] for weight in stored.values()) == plan["objective"]["predicted_non_expert_bytes"]


def test_dropped_loss_is_the_moe_output_error_of_routing_that_experts_tokens_elsewhere(compiled, text_file):
    """Width 0: Mixtral's router re-implemented here with the expert's logit at -inf, run inside
    transformers' own model, against what calibrate measured through RoutingMask."""
    import torch.nn.functional as F

    c = compiled("mixtral")
    layer, expert = 1, 2
    stats = calibrate(c.model_dir, data=text_file, samples=4, seq_len=32, bits=(0,), progress=False)
    ids = _windows(c.model_dir, text_file, 4, 32)
    moe = c.model.model.layers[layer].mlp
    router = moe.gate

    def without_the_expert(hidden):
        logits = F.linear(hidden.reshape(-1, router.hidden_dim), router.weight)
        logits[:, expert] = -torch.inf
        top, index = torch.topk(torch.softmax(logits.float(), dim=-1), router.top_k, dim=-1)
        return logits, top / top.sum(-1, keepdim=True), index

    outputs = []
    handle = moe.register_forward_hook(lambda m, a, out: outputs.append(out))
    try:
        with torch.no_grad():
            c.model(ids)
            router.forward = without_the_expert
            c.model(ids)
    finally:
        del router.forward
        handle.remove()
    expected = torch.linalg.norm(outputs[1] - outputs[0]).item()
    assert expected > 0
    assert stats["layers"][layer]["experts"][expert]["quant_loss"]["0"] == pytest.approx(expected, rel=1e-3)


def test_a_planted_super_expert_is_found_kept_at_the_top_width_and_never_pruned(text_file, tmp_path, capsys):
    """One expert's down projection scaled 50x: calibrate names it (and no other), `moec inspect`
    lists it, the plan keeps it at 8 bits, and a pruned artifact computes it for every token that
    selected it, while the other second choices are dropped."""
    model = save_tiny("mixtral", tmp_path / "planted")
    with torch.no_grad():
        model.model.layers[0].mlp.experts.down_proj[1] *= 50
    model.save_pretrained(tmp_path / "planted")
    stats = calibrate(tmp_path / "planted", data=text_file, samples=4, seq_len=32, progress=False)
    assert stats["super_experts"] == [[0, 1]]
    peaks = [e["max_down_output"] for e in stats["layers"][0]["experts"]]
    assert peaks[1] > 10 * max(peaks[:1] + peaks[2:])
    (tmp_path / "stats.json").write_text(json.dumps(stats))
    assert main(["inspect", str(tmp_path / "stats.json")]) == 0
    assert "super experts layer 0 expert 1 (max |down_proj output|" in capsys.readouterr().out
    plan = make_plan(stats, avg_bits=3, bits=[2, 4, 8], require_top_widths=False)
    assert plan["experts"]["bits"][0][1] == 8 and plan["super_experts"] == [[0, 1]]
    assert make_plan(stats, avg_bits=3, bits=[2, 4, 8], require_top_widths=False,
                     protect_super_experts=False)["super_experts"] == []
    # beta 1 keeps only each token's top-1 (and the super expert)
    plan["pruning"] = {"layers": [{"layer": 0, "beta": 1.0}], "protect_fraction": 0.0}
    plan["quantization"]["group_size"] = 16
    plan["non_expert"] = {key: "float" for key in plan["non_expert"]}  # layer 0's router sees what PyTorch's does
    save_plan(plan, tmp_path / "plan.json")
    moec.compile(tmp_path / "planted", tmp_path / "artifact", plan=tmp_path / "plan.json", progress=False)
    prompt = np.array([[5, 17, 99, 3, 250, 41, 7, 88, 12, 201, 64, 9]])
    routed = []
    handle = model.model.layers[0].mlp.gate.register_forward_hook(lambda m, a, out: routed.append(out[2]))
    with torch.no_grad():
        model(torch.from_numpy(prompt))
    handle.remove()
    second = routed[0][:, 1].numpy()
    artifact = Artifact(tmp_path / "artifact")
    artifact.forward(prompt, np.ones_like(prompt), np.arange(prompt.shape[1])[None], artifact.empty_cache(1))
    assert 0 < (second == 1).sum() < prompt.size  # the planted expert is some tokens' second choice
    # layer 0: each token's top-1, and the planted expert where it came second; layer 1 unpruned
    assert artifact.activations["computed"] == prompt.size + (second == 1).sum() + 2 * prompt.size


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
    plan_file.unlink()
    assert main(["plan", "--stats", str(stats_file), "--avg-bits", "3", "--whole-budget", "--out", str(plan_file)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "moec: error: whole_budget needs the stats' non_expert losses and residual norms, which moec calibrate "
        "--non-expert records"]
    assert not plan_file.exists()


def test_cli_whole_budget_plan(capsys, tmp_path, compiled):
    """calibrate --non-expert, then plan --whole-budget: the widths it chose, and one-line refusals."""
    model_dir = compiled("olmoe").model_dir
    stats_file, plan_file = tmp_path / "stats.json", tmp_path / "plan.json"
    assert main(["calibrate", str(model_dir), "--samples", "4", "--seq-len", "32", "--group-size", "32",
                 "--non-expert", "--out", str(stats_file), "--quiet"]) == 0
    assert set(json.loads(stats_file.read_text())["non_expert"]) == {"attention", "embedding", "lm_head"}
    capsys.readouterr()
    base = ["plan", "--stats", str(stats_file), "--avg-bits", "3", "--group-size", "32", "--out", str(plan_file)]
    assert main([*base, "--whole-budget"]) == 0
    plan = json.loads(plan_file.read_text())
    out = capsys.readouterr().out
    assert plan["objective"]["whole_budget"] is True
    assert f"attention {plan['non_expert']['attention']}, " in out and "embedding" in out
    for extra, message in ((["--alpha", "1"], "whole_budget weighs every weight by the squared error"),
                           (["--scope", "layer"], "whole_budget needs scope \"global\""),
                           (["--sweep", "2:3:0.5"], "--whole-budget does not combine with --sweep")):
        argv = [*base, "--whole-budget", *extra]
        if "--sweep" in extra:
            argv.remove("--avg-bits"), argv.remove("3")
        assert main(argv) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_non_expert_losses_need_a_body_of_layers(compiled, text_file):
    """A body that runs a layer twice per token (Inkling2-Loop) cannot rerun one layer alone: refused."""
    with pytest.raises(moec.errors.MoecError, match="--non-expert cannot rerun a layer on its own"):
        calibrate(compiled("inkling2_loop_text").model_dir, data=text_file, samples=2, seq_len=16, bits=(2,),
                  non_expert=True, progress=False)


@pytest.mark.parametrize("arch", families(["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss", "granitemoe", "phimoe",
                                           "glm4_moe", "qwen3_next"]))
def test_dropped_loss_reruns_only_the_experts_tokens_and_equals_the_full_rerun(arch, compiled, text_file, monkeypatch):
    """Width 0 reruns the MoE block on the tokens whose top-k held each expert, every expert's in one
    call (each token dropping its own expert), not on every token once per expert, and of the
    experts runs only the (token, expert) pairs the masks bring in, the other routes' outputs
    known: per expert the same loss as the whole block rerun with that expert masked and every
    expert computed (within 1e-6 relative), for routers of every kind (softmax, sigmoid with
    groups, top-k then softmax, sparsemixer, a shared expert's gate)."""
    import moec.experts
    from moec.calibrate import _block_outputs, _dropped_losses, _merged_call, _output, moe_inputs
    from moec.experts import RoutingMask, float32_views
    from moec.ops.moe import expert_ffn, expert_weights

    computed = []  # rows each expert computation ran on
    monkeypatch.setattr(moec.experts, "expert_ffn", lambda x, *a, **k: computed.append(len(x)) or expert_ffn(x, *a, **k))
    c = compiled(arch)
    windows = _windows(c.model_dir, text_file, 6, 32).numpy()
    checked = 0
    for layer, module, calls, block in moe_inputs(open_checkpoint(c.model_dir), windows, progress=False, blocks=True):
        stacked = float32_views(module)
        outputs = [np.stack([np.stack([expert_ffn(x[t:t + 1], expert_weights(stacked, int(e), layer.spec), layer.spec)[0]
                                       for e in row]) for t, row in enumerate(indices)]) for x, indices, _ in calls]
        full = _block_outputs(block, module, calls, outputs)
        with torch.no_grad():
            rerun = [_output(block.module(*args, **kwargs)) for args, kwargs in block.calls]  # every expert computed
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(full, rerun))
        merged = _merged_call(block.calls, [len(indices) for _, indices, _ in calls])
        assert merged is not None
        experts = [e for e in range(layer.num_experts) if any((indices == e).any() for _, indices, _ in calls)]
        routed = sum(int((indices == e).any(axis=1).sum()) for e in experts for _, indices, _ in calls)
        rows = []
        handle = block.module.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[:-1].numel()))
        computed.clear()
        try:
            losses = _dropped_losses(layer, block, module, full, calls, outputs, experts, merged)
        finally:
            handle.remove()
        assert rows == [routed]  # one call, on each expert's tokens
        assert routed <= sum(computed) < routed * calls[0][1].shape[1]  # the routes brought in
        assert len(computed) <= layer.num_experts  # each expert run once, on all the tokens it takes
        for expert, incremental in zip(experts, losses):
            with RoutingMask(layer.num_experts, [expert]), torch.no_grad():
                rerun = sum(torch.linalg.vector_norm((_output(block.module(*args, **kwargs)) - exact).double()).item()
                            for (args, kwargs), exact in zip(block.calls, full))
            assert incremental == pytest.approx(rerun, rel=1e-6, abs=0), (layer.layer, expert)
            checked += 1
    assert checked > 2
