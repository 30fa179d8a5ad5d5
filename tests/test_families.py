"""Every supported family: the float artifact matches transformers numerically and in generation."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from moec.runtime import Artifact, generate, left_pad, positions
from tiny import REFUSED, SUPPORTED, families

TOLERANCE = 1e-4
PROMPTS = {1: [[5, 17, 99, 3, 250, 41, 7]], 2: [[5, 17, 99, 3, 250, 41, 7], [88, 12, 201, 64]]}
DECODE_STEPS = 4


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("arch", families())
def test_prefill_and_decode_logits_match_transformers(compiled, arch, batch):
    c = compiled(arch)
    artifact = Artifact(c.artifact_dir)
    ids, mask = left_pad(PROMPTS[batch])
    cache = None  # the cache the model builds for itself (MiniMax's own class), then carried along
    # the past fed back as it comes (each present one step longer), and the past as a buffer with room
    # for the whole sequence, which attention appends to in place where it can (kv_in_place)
    pasts = {"concatenated": artifact.empty_cache(batch),
             "in place": artifact.empty_cache(batch, capacity=ids.shape[1] + DECODE_STEPS + 1)}
    step = ids
    for i in range(1 + DECODE_STEPS):
        pos = positions(mask, step.shape[1])
        with torch.no_grad():
            out = c.model(input_ids=torch.from_numpy(step), attention_mask=torch.from_numpy(mask),
                          position_ids=torch.from_numpy(pos), cache=cache, use_cache=True)
        expected, cache = out.logits.numpy(), out.cache
        real = mask[:, -step.shape[1]:].astype(bool)  # padded positions carry no meaning
        for kind, past in pasts.items():
            logits, pasts[kind] = artifact.forward(step, mask, pos, past)
            diff = np.abs(logits - expected)[real].max()
            assert diff < TOLERANCE, f"{arch} batch {batch} step {i}, past {kind}: max |logit diff| {diff:.3g}"
        if i == 0:  # the head on the last position only, as generation runs it
            last, _ = artifact.forward(step, mask, pos, artifact.empty_cache(batch), logits_to_keep=1)
            assert artifact.keeps_logits and last.shape[1] == 1
            assert np.abs(last[:, 0] - expected[:, -1]).max() < TOLERANCE
        step = logits[:, -1].argmax(-1)[:, None]
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
    verification = artifact.record["verification"]
    assert verification["max_abs_logit_diff"] < TOLERANCE
    assert [step["step"] for step in verification["steps"]] == ["prefill", "decode step 1", "decode step 2"]
    assert verification["pasts"] == ["as they come"] + (["in place"] if artifact.in_place else [])


@pytest.mark.parametrize("arch", families())
def test_greedy_generation_matches_model_generate(compiled, arch):
    c = compiled(arch)
    prompt = PROMPTS[1][0]
    with torch.no_grad():
        expected = c.model.generate(torch.tensor([prompt]), max_new_tokens=20, min_new_tokens=20,
                                    do_sample=False)[0, len(prompt):].tolist()
    tokens = [int(t[0]) for t in generate(Artifact(c.artifact_dir), [prompt], max_new_tokens=20)]
    assert tokens == expected
    assert len(set(tokens)) > 1, "degenerate generation makes this comparison weak"


@pytest.mark.parametrize("arch", families())
def test_artifact_has_one_lowered_moe_per_sparse_layer(compiled, arch):
    import onnx

    c = compiled(arch)
    graph = onnx.load(str(c.artifact_dir / "model.onnx"), load_external_data=False).graph
    sparse = [entry["layer"] for entry in c.record["moe_layers"]]
    # Experts nodes are lowered; an unpruned artifact keeps nothing of the moec domain
    assert [n.op_type for n in graph.node if n.domain == "moec"] == []
    assert len([o for o in graph.output if re.fullmatch(r"expert_activations\.\d+", o.name)]) == len(sparse)
    layers = {entry["layer"]: entry for entry in c.record["moe_layers"]}
    inits = [i.name for i in graph.initializer]
    assert len(inits) == len(set(inits))
    # a looped layer (Inkling2-Loop's) runs its experts once per pass: a lowering each, one set of weights
    passes = [o.name for o in graph.output if o.name.startswith("expert_activations.pass")]
    assert bool(passes) == (arch == "inkling2_loop_text"), passes
    for name in passes:
        layer = int(name.rpartition(".")[2])
        readers = [n for n in graph.node if f"layers.{layer}.experts.0.up_proj" in n.input]
        assert len(readers) == 2, [n.name for n in readers]
    for layer in sparse:
        projections = ("gate", "up", "down") if layers[layer]["experts"]["gate"] != "none" else ("up", "down")
        for e in range(layers[layer]["num_experts"]):
            for proj in projections:
                assert f"layers.{layer}.experts.{e}.{proj}_proj" in inits
    assert c.record["bytes"]["total"] > 0 and c.record["parameters"]["experts"] > 0


@pytest.mark.parametrize("arch, sparse, shared", [("qwen2_moe", [0, 2], True), ("deepseek_v3", [1, 2], True),
                                                  ("mixtral", [0, 1], False)])
def test_dense_layers_stay_dense(compiled, arch, sparse, shared):
    """Qwen2-MoE's mlp_only_layers and DeepSeek-V3's first_k_dense_replace layers are not MoE; the
    families' shared experts are computed by their own code, outside the Experts node."""
    assert [e["layer"] for e in compiled(arch).record["moe_layers"]] == sparse
    assert all(e["shared_expert"] == shared for e in compiled(arch).record["moe_layers"])


# every family transformers 5.25 ships compiles: a Mixtral whose norm reads a value out of the graph
# (`float(...)`, which torch.onnx cannot trace) stands for one that does not
REFUSALS = [*((arch, False) for arch in REFUSED), ("mixtral", True)]


@pytest.mark.parametrize("arch, unexportable", REFUSALS)
def test_unsupported_families_are_refused_in_one_line(arch, unexportable, tmp_path, record_property, monkeypatch):
    """A family moec cannot compile (a state cache beyond what it carries, its own cache class,
    experts or code it cannot express) is refused naming the model type and why, with one of the
    stable reason codes (which a transformers release may move a family between, as 5.25 gave
    bailing_hybrid's experts a gate of their own), before anything is written."""
    import moec
    import tiny
    from moec.errors import Unsupported

    if unexportable:
        from transformers.models.mixtral.modeling_mixtral import MixtralRMSNorm

        monkeypatch.setattr(MixtralRMSNorm, "forward", lambda self, x: x * float(x.abs().max()))
    tiny.save_tiny(arch, tmp_path / "model")
    with pytest.raises(Unsupported) as refused:
        moec.compile(tmp_path / "model", tmp_path / "artifact", progress=False)
    if not unexportable:
        record_property("refused", refused.value.reason)  # bench/compat.py's table reads it
    assert refused.value.model_type == arch and refused.value.reason in Unsupported.REASONS
    assert refused.value.reason == "export" or not unexportable
    assert "\n" not in str(refused.value) and str(refused.value).startswith(f"{arch}: ")
    assert not (tmp_path / "artifact").exists()


@pytest.mark.parametrize("arch", ["mixtral", "olmoe", "qwen3_moe"])
def test_plain_attention_appends_to_its_cache_in_place(compiled, arch):
    """Families whose every layer caches keys and values and attends through scaled_dot_product_attention
    lower each layer onto GroupQueryAttention, and the record lets the runtime share each past with its
    present (the numbers: test_prefill_and_decode_logits_match_transformers, both kinds of past)."""
    c = compiled(arch)
    pasts = [i.name for i in Artifact(c.artifact_dir).past_inputs]
    assert sorted(c.record["kv_in_place"]) == sorted(pasts) and len(pasts) == 2 * c.model.config.num_hidden_layers


def test_a_kv_buffer_too_small_for_the_step_is_refused(compiled):
    from moec.errors import MoecError

    artifact = Artifact(compiled("mixtral").artifact_dir)
    ids, mask = left_pad(PROMPTS[1])
    past = artifact.empty_cache(1, capacity=ids.shape[1] - 2)  # the prompt alone needs more
    with pytest.raises(MoecError, match="holds 5 tokens"):
        artifact.forward(ids, mask, positions(mask, ids.shape[1]), past)


@pytest.mark.parametrize("arch", families([arch for arch in ("qwen3_next", "qwen3_5_moe_text", "kimi_linear")
                                           if arch in SUPPORTED]))
def test_a_long_prefill_of_the_delta_rule_runs_in_chunks_and_matches_transformers(compiled, arch):
    """A prefill runs the delta rule in chunks (moec/linear_attention.py), of 32 tokens with one decay
    per head, of 8 with Kimi's decay per key channel: a left-padded batch of 70 and 45 tokens (the last
    chunk partial) and then a decode step (the Scan over tokens); one sequence of 70, then 20 more
    tokens on its state (chunks from a non-zero state; onnxruntime's GroupQueryAttention takes a
    continued prefill at batch 1 only), then a decode step: all match transformers."""
    import onnx

    c = compiled(arch)
    def scan_bodies(graph):
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    yield from ([attribute.g] if node.op_type == "Scan" else []) + list(scan_bodies(attribute.g))

    graph = onnx.load(str(c.artifact_dir / "model.onnx"), load_external_data=False).graph
    chunked = [body for body in scan_bodies(graph) if any(n.op_type == "CumSum" for n in body.node)]
    assert chunked, "no Scan over chunks in the graph"
    artifact = Artifact(c.artifact_dir)
    rng = np.random.default_rng(0)
    for prompts, more in (([rng.integers(3, 250, 70).tolist(), rng.integers(3, 250, 45).tolist()], [1]),
                          ([rng.integers(3, 250, 70).tolist()], [20, 1])):
        ids, mask = left_pad(prompts)
        past, cache = artifact.empty_cache(len(prompts)), None
        for step in (ids, *(rng.integers(3, 250, (len(prompts), n)) for n in more)):
            if step is not ids:
                mask = np.concatenate([mask, np.ones(step.shape, np.int64)], axis=1)
            pos = positions(mask, step.shape[1])
            with torch.no_grad():
                out = c.model(input_ids=torch.from_numpy(step), attention_mask=torch.from_numpy(mask),
                              position_ids=torch.from_numpy(pos), cache=cache, use_cache=True)
            cache = out.cache
            logits, past = artifact.forward(step, mask, pos, past)
            real = mask[:, -step.shape[1]:].astype(bool)
            diff = np.abs(logits - out.logits.numpy())[real].max()
            assert diff < TOLERANCE, \
                f"{arch}: batch {len(prompts)}, {step.shape[1]} tokens: max |logit diff| {diff:.3g}"
