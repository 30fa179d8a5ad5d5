"""Quantized compile: MatMulNBits packing, the plan policy, every family with a mixed plan, eval."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import moec
from moec.cli import main
from moec.evaluate import evaluate
from moec.planner import DEFAULT_NON_EXPERT, save_plan
from moec.policy import weight_bits, weight_category
from moec.quant import rtn
from moec.runtime import Artifact, generate
from tiny import families


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_row_blocks_in_parallel_give_the_same_codes(bits, monkeypatch):
    """Quantizing and dequantizing by row blocks on several threads is bit-identical to one pass."""
    from moec import quant

    weight = np.random.default_rng(bits).normal(size=(203, 150)).astype(np.float32)
    monkeypatch.setattr(quant, "ROWS_PER_TASK", 10**9)
    whole = quant.quantize_rtn(weight, bits, 32)
    whole_weight = quant.dequantize(*whole, 32)
    monkeypatch.setattr(quant, "ROWS_PER_TASK", 16)
    blocked = quant.quantize_rtn(weight, bits, 32)
    assert all(np.array_equal(a, b) for a, b in zip(whole, blocked))
    assert np.array_equal(quant.dequantize(*blocked, 32), whole_weight)


def make_plan(bits_rows, group_size=32, **non_expert) -> dict:
    return {"format": "moec-plan/1", "model": "tiny", "experts": {"bits": bits_rows},
            "non_expert": {**DEFAULT_NON_EXPERT, **non_expert},
            "quantization": {"method": "rtn", "group_size": group_size}, "pruning": {}}


def test_policy_reads_the_plan():
    plan = make_plan([[2, 4], None, [8, "float"]], attention=4, lm_head=8, dense_mlp="float")
    assert weight_bits(plan, "layers.0.experts.1.up_proj") == 4
    assert weight_bits(plan, "layers.2.experts.0.down_proj") == 8
    assert weight_bits(plan, "layers.2.experts.1.gate_proj") is None  # kept in float
    assert weight_bits(plan, "model.layers.1.self_attn.o_proj.weight") == 4
    assert weight_bits(plan, "lm_head.weight") == 8
    assert weight_bits(plan, "model.layers.1.mlp.gate_proj.weight") is None  # dense_mlp "float"
    # what a MoE block holds besides experts and shared experts is routing: kept in float
    blocks = ["model.layers.0.mlp", "model.layers.2.mlp"]
    assert weight_bits(plan, "model.layers.0.mlp.gate.weight", blocks) is None
    assert weight_bits(plan, "model.layers.2.mlp.router.bias", blocks) is None
    assert weight_bits(plan, "model.layers.0.mlp.shared_expert_gate.weight", blocks) is None
    assert weight_bits(plan, "model.layers.0.mlp.shared_expert.up_proj.weight", blocks) == 4
    assert weight_bits(plan, "model.layers.2.mlp.shared_experts.down_proj.weight", blocks) == 4
    assert weight_bits(plan, "model.layers.1.mlp.gate_proj.weight", blocks) is None  # dense, not a block
    # a block that is its decoder layer (Gemma 4): its attention and dense MLP are no routing, its router is
    layers = ["model.layers.0", "model.layers.1"]
    assert weight_bits(plan, "model.layers.1.self_attn.q_proj.weight", layers) == 4
    assert weight_bits(plan, "model.layers.0.router.proj.weight", layers) is None
    assert weight_category("model.layers.0.mlp.up_proj.weight", layers) == "dense_mlp"


def test_quantization_specs_give_each_weight_of_the_graph_its_width_and_the_target_container():
    """One map, from the plan, the traced graph's weights and the target, before any pass runs."""
    from graphs import moe_layers

    from moec.policy import product_weights, quantization_specs
    from moec.targets import get_target

    graph = moe_layers([0, 2])  # routers are MatMul weights of the MoE blocks: kept in float
    names = product_weights(graph)
    assert names[:1] == ["layers.0.router.weight"] and "layers.2.experts.3.down_proj" in names
    assert len(names) == 2 * (1 + 4 * 3)
    plan = make_plan([[2, 4, 8, "float"], None, [1, 2, 3, 4]])
    for target, containers in (("cpu", {1: 2, 2: 2, 3: 4, 4: 4, 8: 8}), ("cuda", {1: 4, 2: 4, 3: 4, 4: 4, 8: 8})):
        specs = quantization_specs(plan, names, ["layers.0", "layers.2"], get_target(target))
        assert "layers.0.router.weight" not in specs and "layers.0.experts.3.up_proj" not in specs  # float
        assert {name: (q.bits, q.stored_bits) for name, q in specs.items() if ".experts.1." in name} == \
            {f"layers.{layer}.experts.1.{p}_proj": (bits, containers[bits])
             for layer, bits in ((0, 4), (2, 2)) for p in ("gate", "up", "down")}
        assert all(q.group_size == 32 and q.method == "rtn" for q in specs.values())
    assert quantization_specs(None, names, [], get_target("cpu")) == {}


def test_a_checkpoint_matrix_used_as_the_products_k_by_n_operand_stays_float():
    """The quantizers group a checkpoint tensor along its stored rows, which are a linear layer's
    outputs ([N, K], exported transposed) but a bare matrix's inputs where the model multiplies by
    it as stored ([K, N]: Inkling's relative-logit bank); the front end marks such a tensor, and no
    plan quantizes it."""
    import onnx_ir as ir

    from moec.passes.transpose_weights import STORED_AS_IS
    from moec.policy import product_weights

    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, 16]))
    weights = {name: ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([16, 16]),
                              const_value=ir.tensor(np.ones((16, 16), np.float32)))
               for name in ("linear.weight", "bank.proj")}
    weights["bank.proj"].meta[STORED_AS_IS] = True  # the linear weight is the transpose pass's copy: unmarked
    nodes = [ir.node("MatMul", [x, w]) for w in weights.values()]
    graph = ir.Graph([x], [n.outputs[0] for n in nodes], nodes=nodes, initializers=list(weights.values()))
    assert product_weights(ir.Model(graph, ir_version=10)) == ["linear.weight"]


def _mixed_plan(record, seed=0):
    """Widths 2/4/8/float spread over every MoE layer's experts, seeded."""
    rng = np.random.default_rng(seed)
    rows = [None] * record["num_layers"]
    for entry in record["moe_layers"]:
        choices = [2, 4, 8, "float"] * entry["num_experts"]
        rows[entry["layer"]] = ["float" if b == "float" else int(b) for b in rng.permutation(choices)[: entry["num_experts"]]]
    return make_plan(rows)


@pytest.mark.parametrize("arch", families(["mixtral", "deepseek_v3", "gpt_oss", "qwen3_next", "zaya", "gemma4_text"]))
def test_mixed_plan_compiles_verifies_and_runs(arch, compiled, tmp_path):
    """Every width 2/4/8/float at random over the experts, the last MoE layer's expert 1 dropped, and
    top-p pruning keeping a super expert where the router has more than one expert a token (each
    family's planned mixed plan is compiled by test_calibrate_then_plan_every_family; Zaya, which
    calibrate refuses, has its mixed plan here); attention at the plan's width (Gemma 4's too, which
    sits in its MoE block)."""
    c = compiled(arch)
    plan_file = tmp_path / "plan.json"
    plan = _mixed_plan(c.record)
    first, last = c.record["moe_layers"][0], c.record["moe_layers"][-1]
    plan["experts"]["bits"][last["layer"]][1] = 0
    if first["top_k"] > 1:
        plan["pruning"] = {"layers": [{"layer": first["layer"], "top_p": 0.5}], "protect_fraction": 0.0}
        plan["super_experts"] = [[first["layer"], 0]]
    save_plan(plan, plan_file)
    record = moec.compile(c.model_dir, tmp_path / "q", plan=plan_file, progress=False)
    check = record["verification"]
    assert check["max_abs_logit_diff"] < 1e-3  # packing and graph exact against dequantized PyTorch
    assert check["shipped_kernels"]["max_abs_logit_diff"] > 0  # int8 activations: measured, recorded
    q = record["quantization"]
    for layer in q["experts"]:
        assert [e["bits"] for e in layer["experts"]] == plan["experts"]["bits"][layer["layer"]]
    attention = [weight for name, weight in q["non_expert"].items() if ".self_attn." in name]
    assert attention and {weight["bits"] for weight in attention} == {plan["non_expert"]["attention"]}
    assert record["bytes"]["total"] < c.record["bytes"]["total"]
    assert record["dropped_experts"] == [[last["layer"], 1]]
    assert record["super_experts"] == plan.get("super_experts", [])
    tokens = [int(t[0]) for t in generate(Artifact(tmp_path / "q"), [[3, 14, 15, 92]], 5)]
    assert len(tokens) == 5


def test_paper_widths_go_into_larger_containers(compiled, tmp_path):
    c = compiled("mixtral")
    save_plan(make_plan([[1, 3, 2, 3], [3, 1, 1, 2]]), tmp_path / "plan.json")
    record = moec.compile(c.model_dir, tmp_path / "q", plan=tmp_path / "plan.json", progress=False)
    q = record["quantization"]
    assert q["widths_in_larger_containers"] == {"1": 2, "3": 4}
    assert [e["stored_bits"] for e in q["experts"][0]["experts"]] == [2, 4, 2, 4]
    assert record["verification"]["max_abs_logit_diff"] < 1e-3


def test_plan_for_another_shape_is_refused(capsys, compiled, tmp_path):
    plan = make_plan([[2, 4, 8, 2]]) | {"model": str(compiled("mixtral").model_dir)}  # one layer; the model has two
    save_plan(plan, tmp_path / "plan.json")
    code = main(["compile", str(compiled("mixtral").model_dir), "--plan", str(tmp_path / "plan.json"),
                 "--out", str(tmp_path / "q"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "experts.bits has 1 layers, the model has 2" in err and "\n" not in err
    assert not (tmp_path / "q").exists()


def test_compile_takes_the_model_the_plan_names(capsys, compiled, tmp_path):
    """`moec compile --plan plan.json --out DIR` compiles the plan's model; a MODEL_DIR that is
    another model, or a plan naming none without MODEL_DIR, is one line and nothing written."""
    model_dir = compiled("mixtral").model_dir
    plan = make_plan([[2, 4, 8, 2], [8, 4, 2, 4]]) | {"model": str(model_dir)}
    save_plan(plan, tmp_path / "plan.json")
    assert main(["compile", "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "q"), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["source_model"]["path"] == str(model_dir.resolve())
    assert [[e["bits"] for e in layer["experts"]] for layer in record["quantization"]["experts"]] == \
        plan["experts"]["bits"]
    other = shutil.copytree(model_dir, tmp_path / "other")  # another folder: the plan was not made for it
    for args, words in ((["compile", str(other)], ["made for", str(model_dir)]), (["compile"], ["names no model"])):
        if len(args) == 1:
            save_plan(plan | {"model": None}, tmp_path / "plan.json")
        code = main([*args, "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "r")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and "\n" not in err and all(word in err for word in words), err
        assert not (tmp_path / "r").exists()


def test_eval_artifact_matches_pytorch_and_quantization_costs_perplexity(compiled, tmp_path):
    c = compiled("olmoe")
    data = tmp_path / "text.txt"
    data.write_text("Mixture of experts route each token to a few experts. " * 60)
    float_art = evaluate(c.artifact_dir, data, samples=4, seq_len=32)
    torch_ref = evaluate(c.model_dir, data, samples=4, seq_len=32)
    assert float_art["tokens"] == torch_ref["tokens"] == 4 * 31
    assert float_art["perplexity"] == pytest.approx(torch_ref["perplexity"], rel=1e-5)
    save_plan(make_plan([[2] * 8, [2] * 8]), tmp_path / "plan.json")
    moec.compile(c.model_dir, tmp_path / "q2", plan=tmp_path / "plan.json", progress=False)
    assert evaluate(tmp_path / "q2", data, samples=4, seq_len=32)["perplexity"] > float_art["perplexity"]


def test_eval_cli_json(capsys, compiled, tmp_path):
    data = tmp_path / "text.txt"
    data.write_text("def f(x):\n    return x\n" * 50)
    assert main(["eval", str(compiled("mixtral").artifact_dir), "--data", str(data), "--samples", "2",
                 "--seq-len", "16", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == 30 and result["perplexity"] > 1 and result["runtime"] == "onnxruntime"


@pytest.mark.parametrize("bits,fused,layer0_packs", [(2, True, 8), (4, True, 8), (8, True, 8), (8, False, 12)])
def test_verification_catches_a_packing_bug_and_names_the_layer(bits, fused, layer0_packs, compiled, tmp_path,
                                                                monkeypatch):
    """A wrong kernel input (here: scales off by 1% in layer 0's experts) fails the build, whether the
    experts are one QMoE node (4 experts x fc1, fc2) at any width or MatMulNBits each (4 experts x 3
    projections)."""
    import moec.targets.cpu
    from moec.passes import lower_moe, matmul_nbits

    monkeypatch.setattr(moec.targets.cpu, "QMOE_MIN_EXPERTS", 0 if fused else 1000)

    real_pack = matmul_nbits.pack_matmul_nbits
    calls = []

    def corrupt(codes, scales, zeros, bits, block_size):
        calls.append(1)
        packed, s, z = real_pack(codes, scales, zeros, bits, block_size)
        return packed, s * 1.01 if len(calls) <= layer0_packs else s, z

    monkeypatch.setattr(matmul_nbits, "pack_matmul_nbits", corrupt)
    monkeypatch.setattr(lower_moe, "pack_matmul_nbits", corrupt)
    c = compiled("mixtral")
    save_plan(make_plan([[bits] * 4, [bits] * 4], attention="float", lm_head="float"), tmp_path / "plan.json")
    with pytest.raises(moec.MoecError, match="verification failed.*error is in layer 0's MLP/MoE"):
        moec.compile(c.model_dir, tmp_path / "q", plan=tmp_path / "plan.json", progress=False)
    assert not (tmp_path / "q").exists()


def test_gptq_beats_rtn_on_the_product_it_preserves():
    from moec.gptq import gptq

    rng = np.random.default_rng(0)
    weight = rng.normal(size=(32, 128)).astype(np.float32)
    x = rng.normal(size=(512, 128)) @ rng.normal(size=(128, 128)) * 0.1  # correlated inputs
    for bits in (2, 4):
        q = gptq(weight, x.T @ x, bits, group_size=32)
        assert q.codes.max() <= 2**bits - 1 and q.method == "gptq"
        gptq_error = np.linalg.norm(x @ (q.dequantize() - weight).T)
        rtn_error = np.linalg.norm(x @ (rtn(weight, bits, 32).dequantize() - weight).T)
        assert gptq_error < 0.9 * rtn_error


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_the_weighted_grid_never_loses_to_minmax_and_halves_the_two_bit_error(bits):
    """Each block's weighted-grid (scale, zero) has at most minmax's importance-weighted error (minmax
    is one of its candidates); with calibration-like importances (a few channels carrying most of
    the activation energy, one outlier weight column) it cuts that error by far at 2 bits."""
    from moec.quant import block_params, grid_params

    rng = np.random.default_rng(bits)
    weight = rng.normal(size=(64, 8, 32)).astype(np.float32)
    weight[:, :, 5] *= 6
    importance = rng.gamma(0.5, size=(8, 32)).astype(np.float32)

    def weighted_error(scale, zero):
        q = np.clip(np.round(weight / scale[..., None]) + zero[..., None], 0, 2**bits - 1)
        return (importance * (weight - (q - zero[..., None]) * scale[..., None]) ** 2).sum(-1)

    minmax = weighted_error(*block_params(weight, bits))
    weighted = weighted_error(*grid_params(weight, bits, "weighted", importance))
    assert np.all(weighted <= minmax * (1 + 1e-6))
    assert weighted.sum() < {2: 0.7, 3: 0.85, 4: 0.95}[bits] * minmax.sum()


def test_the_weighted_grid_preserves_the_product_better_for_rtn_and_gptq():
    """Weighted by the inputs' second moments, the grid keeps X W^T closer than minmax does, in RTN
    and as GPTQ's grid."""
    from moec.gptq import gptq

    rng = np.random.default_rng(1)
    weight = rng.normal(size=(48, 128)).astype(np.float32)
    x = rng.normal(size=(512, 128)) * rng.gamma(0.5, size=128)  # uneven input channels, as activations are
    error = lambda q: np.linalg.norm(x @ (q.dequantize() - weight).T)  # noqa: E731
    for bits in (2, 3):
        moments = (x * x).sum(0)
        assert error(rtn(weight, bits, 32, "weighted", moments)) < 0.9 * error(rtn(weight, bits, 32))
        assert error(gptq(weight, x.T @ x, bits, 32, "weighted")) < error(gptq(weight, x.T @ x, bits, 32))


@pytest.mark.parametrize("method, prior", [("gptq", 0), ("rtn", 0), ("gptq", 64)])
def test_calibrated_plan_compiles_and_lists_rtn_fallbacks(compiled, tmp_path, method, prior):
    """GPTQ and the weighted grid read each expert's routed calibration tokens; the artifact verifies
    against the same dequantized weights, and GPTQ's experts with too few tokens are listed. With a
    layer prior, those experts are GPTQ's too: their statistics also count the layer's."""
    c = compiled("qwen3_moe")
    plan = _mixed_plan(c.record, seed=1)
    plan["quantization"] |= {"method": method, "grid": "weighted", "layer_prior_tokens": prior}
    save_plan(plan, tmp_path / "plan.json")
    data = tmp_path / "text.txt"
    data.write_text("def route(tokens, experts):\n    return sorted(experts)[:2]\n" * 80)
    record = moec.compile(c.model_dir, tmp_path / "q", plan=tmp_path / "plan.json", data=data, samples=4,
                          seq_len=24, progress=False)  # 96 tokens x top-3 over 8 experts: some get < 32
    assert record["verification"]["max_abs_logit_diff"] < 1e-3
    q = record["quantization"]
    assert q["method"] == method and q["grid"] == "weighted" and q["layer_prior_tokens"] == prior
    experts = [(layer["layer"], e, x) for layer in q["experts"] for e, x in enumerate(layer["experts"])]
    quantized = [(layer, e, x) for layer, e, x in experts if x["bits"] != "float"]
    few = [[layer, e] for layer, e, x in quantized if x["calibration_tokens"] < 32]
    assert few
    if method == "rtn":
        assert {x["quantizer"] for _, _, x in quantized} == {"rtn"}
    elif prior:
        assert {x["quantizer"] for _, _, x in quantized} == {"gptq"} and q["rtn_fallback_experts"] == []
    else:
        assert q["rtn_fallback_experts"] == few  # few tokens: RTN, and listed
        assert {x["quantizer"] for layer, e, x in quantized if [layer, e] in few} == {"rtn"}
        assert {x["quantizer"] for layer, e, x in quantized if [layer, e] not in few} == {"gptq"}


def test_a_layer_prior_steadies_a_rarely_routed_experts_hessian():
    """GPTQ on a few tokens fits them and misses the rest of what reaches the expert; shrinking the
    Hessian toward the layer's (all tokens, scaled to `prior` tokens) lowers the error on unseen tokens."""
    from moec.gptq import gptq

    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(64, 64))
    layer_tokens = rng.normal(size=(4096, 64)) @ mixing
    routed, unseen = layer_tokens[:24], layer_tokens[2048:]  # 24 tokens: fewer than the 64 input channels
    weight = rng.normal(size=(32, 64)).astype(np.float32)
    prior = 256 / len(layer_tokens)

    def unseen_error(hessian):
        return np.linalg.norm(unseen @ (gptq(weight, hessian, 2, 32).dequantize() - weight).T)

    alone = unseen_error(routed.T @ routed)
    shrunk = unseen_error(routed.T @ routed + prior * layer_tokens.T @ layer_tokens)
    assert shrunk < 0.9 * alone


def test_many_experts_compute_in_subgraphs_quantized_and_verified(tmp_path):
    """A layer with more experts than the CPU target's EXPERTS_PER_SUBGRAPH computes them in If
    subgraphs; their MatMulNBits weights live in the main graph, the exact-kernel check reaches
    into the subgraphs, and the artifact verifies and generates."""
    import onnx
    import transformers

    import tiny
    from moec.targets.cpu import EXPERTS_PER_SUBGRAPH

    experts = EXPERTS_PER_SUBGRAPH + 4
    config = transformers.MixtralConfig(**tiny.COMMON, intermediate_size=64, num_hidden_layers=2,
                                        num_local_experts=experts, num_experts_per_tok=2)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"format": "moec-plan/1", "model": "tiny",
                                "experts": {"bits": [[(2, 4, 8)[e % 3] for e in range(experts)]] * 2},
                                "non_expert": DEFAULT_NON_EXPERT, "quantization": {"method": "rtn", "group_size": 32},
                                "pruning": {}}))
    record = moec.compile(tmp_path / "model", tmp_path / "artifact", plan=plan, progress=False)
    assert record["verification"]["max_abs_logit_diff"] < 1e-3
    graph = onnx.load(str(tmp_path / "artifact" / "model.onnx"), load_external_data=False).graph
    ifs = [n for n in graph.node if n.op_type == "If"]
    assert len(ifs) == 2 * 2  # two chunks per layer
    inside = [m for n in ifs for a in n.attribute if a.name == "then_branch" for m in a.g.node]
    # per expert: gate and up as one product (passes/merge_sibling_products.py), then down
    assert sum(m.op_type == "MatMulNBits" for m in inside) == 2 * experts * 2
    assert sum(m.op_type == "Split" and "gate_proj" in m.name for m in inside) == 2 * experts
    # fewer experts a layer than the CPU target hands to QMoE (moec.targets.cpu.QMOE_MIN_EXPERTS)
    assert record["quantization"]["kernels"] == {"com.microsoft.MatMulNBits": 2 * experts, "com.microsoft.QMoE": 0}
    assert all(not a.g.initializer for n in ifs for a in n.attribute)
    assert len(list(generate(Artifact(tmp_path / "artifact"), [[5, 17, 99]], max_new_tokens=4))) == 4
