"""Checkpoints as published: FP8 with block scales (DeepSeek-V3, Qwen3-MoE) and MXFP4 experts
(gpt-oss) are dequantized as they are read, to exactly what transformers loads from the same folder,
and compile to artifacts that match transformers on that folder."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import moec
import tiny
from moec.checkpoint import load_model, open_checkpoint
from moec.errors import MoecError
from moec.runtime import Artifact
from published import fp8_dequantized, write_fp8, write_mxfp4

FORMATS = {"deepseek_v3": "fp8", "qwen3_moe": "fp8", "gpt_oss": "mxfp4"}
# MXFP4's blocks are 32 wide: the tiny gpt-oss's expert width (48) is not a multiple
OVERRIDES = {"gpt_oss": {"intermediate_size": 64}}
LOGIT_TOLERANCE = 1e-4  # float32 tiny sources dequantize exactly: the float artifact's usual bound
PROMPT = np.array([[5, 17, 99, 3, 250, 41, 7, 64]])
# one worker: the published folders are built once (module fixture) and each traced once
pytestmark = pytest.mark.xdist_group("published")


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """published(arch) -> (folder of the family's tiny model in its published format, the names of
    its quantized tensors, the float folder it was written from)."""
    cache = {}

    def get(arch):
        if arch not in cache:
            root = tmp_path_factory.mktemp(f"{arch}-{FORMATS[arch]}")
            tiny.save_tiny(arch, root / "float", **OVERRIDES.get(arch, {}))
            write = write_fp8 if FORMATS[arch] == "fp8" else write_mxfp4
            cache[arch] = root / "published", write(root / "float", root / "published"), root / "float"
        return cache[arch]

    return get


def transformers_model(folder, method: str):
    """transformers' own load of a published folder, dequantized (as it does on a CPU) to float32."""
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config, Mxfp4Config

    config = (FineGrainedFP8Config if method == "fp8" else Mxfp4Config)(dequantize=True)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, quantization_config=config).eval()


@pytest.mark.parametrize("arch", FORMATS)
def test_dequantized_weights_equal_transformers(published, arch):
    folder, quantized, float_folder = published(arch)
    assert quantized, "the writer quantized nothing"
    ours = load_model(open_checkpoint(folder)).state_dict()
    theirs = transformers_model(folder, FORMATS[arch]).state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    # the codes were dequantized, not read raw: near the float weights they were written from
    original = load_model(open_checkpoint(float_folder)).state_dict()
    changed = [key for key in ours if not torch.equal(ours[key], original[key])]
    # per-expert FP8 tensors load into the stacked experts; every other quantized tensor is a model key
    assert {name for name in quantized if not re.search(r"experts\.\d+\.", name)} <= set(changed)
    assert any(".experts." in key for key in changed)
    bound = 0.05 if FORMATS[arch] == "fp8" else 0.2
    for key in changed:
        error = (ours[key] - original[key]).norm() / original[key].norm()
        assert 0 < error < bound, (key, float(error))


@pytest.mark.parametrize("arch", FORMATS)
def test_artifact_matches_transformers_on_the_published_folder(published, arch, tmp_path):
    folder, _, _ = published(arch)
    record = moec.compile(folder, tmp_path / "artifact", progress=False)
    assert record["source_model"]["format"] == FORMATS[arch]
    assert record["verification"]["max_abs_logit_diff"] < 1e-4  # against moec's dequantized weights
    artifact = Artifact(tmp_path / "artifact")
    mask, positions = np.ones_like(PROMPT), np.arange(PROMPT.shape[1])[None]
    logits, _ = artifact.forward(PROMPT, mask, positions, artifact.empty_cache(1))
    with torch.no_grad():
        expected = transformers_model(folder, FORMATS[arch])(torch.from_numpy(PROMPT)).logits.numpy()
    diff = float(np.abs(logits - expected).max())
    assert diff < LOGIT_TOLERANCE, diff


def test_fp8_experts_of_a_bf16_checkpoint_are_dequantized_as_transformers_does_in_bf16(tmp_path):
    """Published FP8 checkpoints keep their other tensors in bf16, so the dequantized routed experts
    stay in bf16 (as transformers dequantizes them on a CPU; float32 would double a layer's
    memory), each codes x float32 scale product rounded once: they equal transformers' bf16 load,
    and the artifact matches transformers' float32 load with its routed experts rounded to bf16."""
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    tiny.save_tiny("qwen3_moe", tmp_path / "float")
    folder = tmp_path / "published"
    write_fp8(tmp_path / "float", folder, dtype=torch.bfloat16)
    record = moec.compile(folder, tmp_path / "artifact", progress=False)
    bf16 = dict(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16,
                                                     quantization_config=FineGrainedFP8Config(dequantize=True))
                .named_parameters())
    from moec.experts import checkpoint_experts_layers
    from moec.weights import StreamingModel

    stream = StreamingModel(open_checkpoint(folder))
    layers = checkpoint_experts_layers(stream)
    for layer in layers:
        experts = stream.model.get_submodule(layer.path)
        stream.keep_stored([experts])
        stream.load(layer.path)
        for name, tensor in experts.named_parameters():
            assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, bf16[f"{layer.path}.{name}"]), name
        stream.unload(layer.path)
    model = transformers_model(folder, "fp8")
    with torch.no_grad():
        for layer in layers:
            for tensor in model.get_submodule(layer.path).parameters():
                tensor.copy_(tensor.to(torch.bfloat16).float())
        expected = model(torch.from_numpy(PROMPT)).logits.numpy()
    artifact = Artifact(tmp_path / "artifact")
    logits, _ = artifact.forward(PROMPT, np.ones_like(PROMPT), np.arange(PROMPT.shape[1])[None],
                                 artifact.empty_cache(1))
    assert record["verification"]["max_abs_logit_diff"] < 1e-4
    assert float(np.abs(logits - expected).max()) < LOGIT_TOLERANCE


def test_fp8_tiles_cut_short_by_the_shape_dequantize_by_the_published_formula(tmp_path):
    """DeepSeek-V3's kv_a_proj_with_mqa has 576 rows in 128-row tiles, its last tile half full
    (5 row scales). transformers 5.24's Fp8Dequantize derives the tile from the scale grid: it
    refuses 576 rows over 5 scales, and tiles tiny DeepSeek-V3's 24 rows over 2 scales as 12-row
    tiles without a word (0.067 off here). In 16 x 16 tiles every FP8 weight, the cut one included,
    equals the published formula."""
    tiny.save_tiny("deepseek_v3", tmp_path / "float")
    folder = tmp_path / "published"
    quantized = write_fp8(tmp_path / "float", folder, block=16)
    stored = load_file(folder / "model.safetensors")
    cut = [name for name in quantized if stored[name].shape[0] % 16 or stored[name].shape[1] % 16]
    assert cut and all("kv_a_proj_with_mqa" in name for name in cut)
    ours = load_model(open_checkpoint(folder)).state_dict()
    for name in quantized:
        expected = fp8_dequantized(stored[name], stored[f"{name}_scale_inv"], 16)
        if name in ours:  # per-expert tensors load into stacked ones, compared by the other tests
            assert torch.equal(ours[name], expected), name


def test_a_published_fp8_model_calibrates_plans_and_compiles(published, tmp_path):
    from moec.calibrate import calibrate
    from moec.planner import make_plan, save_plan

    folder, _, _ = published("qwen3_moe")
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    stats = calibrate(folder, data=text, samples=4, seq_len=32, progress=False)
    plan = make_plan(stats, avg_bits=3.0, bits=[2, 4, 8], scope="global")
    plan["quantization"]["group_size"] = 16
    save_plan(plan, tmp_path / "plan.json")
    record = moec.compile(folder, tmp_path / "artifact", plan=tmp_path / "plan.json", progress=False)
    assert record["source_model"]["format"] == "fp8"
    assert record["verification"]["max_abs_logit_diff"] < 1e-3


def _rewrite(folder, tmp_path, codes_suffix, change):
    """A copy of the published folder in which `change(tensors, codes)` edits the tensors in place,
    `codes` the name of a layer-1 quantized tensor ending in `codes_suffix`; returns (copy, codes)."""
    import shutil

    target = tmp_path / "broken"
    shutil.copytree(folder, target)
    tensors = load_file(target / "model.safetensors")
    codes = next(name for name in sorted(tensors) if name.endswith(codes_suffix) and "layers.1." in name)
    change(tensors, codes)
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target, codes


@pytest.mark.parametrize("arch, codes_suffix, scales_of", [
    ("deepseek_v3", "experts.3.up_proj.weight", lambda name: f"{name}_scale_inv"),
    ("gpt_oss", "gate_up_proj_blocks", lambda name: name.replace("_blocks", "_scales")),
])
def test_codes_without_scales_are_refused_by_name(published, tmp_path, arch, codes_suffix, scales_of):
    broken, codes = _rewrite(published(arch)[0], tmp_path, codes_suffix,
                             lambda tensors, codes: tensors.pop(scales_of(codes)))
    with pytest.raises(MoecError, match=f"tensor {codes} holds .* codes, but the checkpoint has no "
                                        f"{scales_of(codes)}"):
        load_model(open_checkpoint(broken))  # the streaming reader every command reads through


@pytest.mark.parametrize("arch, codes_suffix, scales_of", [
    ("qwen3_moe", "experts.0.down_proj.weight", lambda name: f"{name}_scale_inv"),
    ("gpt_oss", "down_proj_blocks", lambda name: name.replace("_blocks", "_scales")),
])
def test_scales_of_the_wrong_shape_are_refused_by_name(published, tmp_path, arch, codes_suffix, scales_of):
    def halve_scales(tensors, codes):
        tensors[scales_of(codes)] = tensors[scales_of(codes)][..., ::2].contiguous()

    broken, codes = _rewrite(published(arch)[0], tmp_path, codes_suffix, halve_scales)
    with pytest.raises(MoecError, match=f"tensor {scales_of(codes)} has shape"):
        load_model(open_checkpoint(broken))


@pytest.mark.parametrize("method, message", [
    ("gptq", "moec quantizes a model itself"),
    ("awq", "moec quantizes a model itself"),
    ("bitnet", "quant_method 'bitnet'; moec reads floating-point checkpoints and the published formats fp8, mxfp4"),
])
def test_other_quantized_checkpoints_are_refused_in_one_line(published, tmp_path, method, message):
    import shutil

    folder, _, _ = published("qwen3_moe")
    target = tmp_path / "other"
    shutil.copytree(folder, target)
    config = json.loads((target / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4}
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(MoecError, match=message):
        open_checkpoint(target)


def test_fp8_codes_in_a_float_checkpoint_are_refused(published, tmp_path):
    """Without a quantization_config, FP8 codes would be read as if they were the weights."""
    import shutil

    folder, quantized, _ = published("qwen3_moe")
    target = tmp_path / "unlabelled"
    shutil.copytree(folder, target)
    config = json.loads((target / "config.json").read_text())
    del config["quantization_config"]
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(MoecError, match=r"is stored as F8_E4M3; moec reads floating-point weights \(F32, F16, BF16\)$"):
        load_model(open_checkpoint(target))
