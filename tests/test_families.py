"""Every supported family: the float artifact matches transformers numerically and in generation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from moec.runtime import Artifact, generate, left_pad, positions
from tiny import ARCHITECTURES

TOLERANCE = 1e-4
PROMPTS = {1: [[5, 17, 99, 3, 250, 41, 7]], 2: [[5, 17, 99, 3, 250, 41, 7], [88, 12, 201, 64]]}
DECODE_STEPS = 4


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_prefill_and_decode_logits_match_transformers(compiled, arch, batch):
    c = compiled(arch)
    artifact = Artifact(c.artifact_dir)
    ids, mask = left_pad(PROMPTS[batch])
    cache, past = DynamicCache(), artifact.empty_cache(batch)
    step = ids
    for i in range(1 + DECODE_STEPS):
        pos = positions(mask, step.shape[1])
        with torch.no_grad():
            expected = c.model(input_ids=torch.from_numpy(step), attention_mask=torch.from_numpy(mask),
                               position_ids=torch.from_numpy(pos), cache=cache,
                               use_cache=True).logits.numpy()
        logits, past = artifact.forward(step, mask, pos, past)
        real = mask[:, -step.shape[1]:].astype(bool)  # padded positions carry no meaning
        diff = np.abs(logits - expected)[real].max()
        assert diff < TOLERANCE, f"{arch} batch {batch} step {i}: max |logit diff| {diff:.3g}"
        step = logits[:, -1].argmax(-1)[:, None]
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
    assert artifact.record["verification"]["max_abs_logit_diff"] < TOLERANCE


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_generation_matches_model_generate(compiled, arch):
    c = compiled(arch)
    prompt = PROMPTS[1][0]
    with torch.no_grad():
        expected = c.model.generate(torch.tensor([prompt]), max_new_tokens=20, min_new_tokens=20,
                                    do_sample=False)[0, len(prompt):].tolist()
    tokens = [int(t[0]) for t in generate(Artifact(c.artifact_dir), [prompt], max_new_tokens=20)]
    assert tokens == expected
    assert len(set(tokens)) > 1, "degenerate generation makes this comparison weak"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_artifact_has_one_lowered_moe_per_sparse_layer(compiled, arch):
    import onnx

    c = compiled(arch)
    graph = onnx.load(str(c.artifact_dir / "model.onnx"), load_external_data=False).graph
    sparse = [entry["layer"] for entry in c.record["moe_layers"]]
    # MoE nodes are lowered; what stays in the moec domain is each layer's DynamicGating function call
    assert [n.op_type for n in graph.node if n.domain == "moec"] == ["DynamicGating"] * len(sparse)
    assert {(f.name, f.overload) for f in onnx.load(str(c.artifact_dir / "model.onnx"), load_external_data=False)
            .functions} >= {("DynamicGating", n.overload) for n in graph.node if n.domain == "moec"}
    experts = {entry["layer"]: entry["num_experts"] for entry in c.record["moe_layers"]}
    inits = {i.name for i in graph.initializer}
    for layer in sparse:
        for e in range(experts[layer]):
            for proj in ("gate", "up", "down"):
                assert f"layers.{layer}.experts.{e}.{proj}_proj" in inits
    assert c.record["bytes"]["total"] > 0 and c.record["parameters"]["experts"] > 0


def test_dense_layers_stay_dense(compiled):
    """Qwen2-MoE's mlp_only_layers and DeepSeek-V3's first_k_dense_replace layers are not MoE."""
    assert [e["layer"] for e in compiled("qwen2_moe").record["moe_layers"]] == [0, 2]
    assert [e["layer"] for e in compiled("deepseek_v3").record["moe_layers"]] == [1, 2]
    assert all(e["shared_expert"] for e in compiled("deepseek_v3").record["moe_layers"])
