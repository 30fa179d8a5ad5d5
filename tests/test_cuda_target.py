"""The CUDA target without a GPU: its float16 artifact builds, passes onnx.checker, and on the CPU
execution provider computes what the CPU artifact computes, within float16 tolerance."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import onnx
import pytest

import moec
from moec.runtime import Artifact, Tokenizer, generate, left_pad, positions
from moec.targets import get_target

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "samples" / "tiny-mixtral"
CUDA = get_target("cuda")


def logits(artifact: Artifact, sequences: list[list[int]]) -> np.ndarray:
    """Logits at the real (not padding) positions of the left-padded batch."""
    ids, mask = left_pad(sequences)
    out = artifact.forward(ids, mask, positions(mask, ids.shape[1]), artifact.empty_cache(len(sequences)))[0]
    return out[mask.astype(bool)]


def within_float16_tolerance(got: np.ndarray, want: np.ndarray) -> float:
    diff = float(np.abs(got - want).max())
    assert diff <= CUDA.verify_tolerance + CUDA.verify_relative_tolerance * float(np.ptp(want)), diff
    return diff


@pytest.fixture(scope="module")
def sample_cuda(tmp_path_factory):
    out = tmp_path_factory.mktemp("cuda") / "artifact"
    moec.compile(SAMPLE, out, target="cuda", progress=False)
    return out


def test_float16_artifact_passes_the_checker_and_declares_its_target(sample_cuda):
    onnx.checker.check_model(str(sample_cuda / "model.onnx"), full_check=True)
    record = json.loads((sample_cuda / "moec.json").read_text())
    assert record["target"] == "cuda" and record["providers"] == list(CUDA.providers)
    model = onnx.load(str(sample_cuda / "model.onnx"), load_external_data=False)
    io_types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
    assert io_types["logits"] == onnx.TensorProto.FLOAT16
    assert all(t == onnx.TensorProto.FLOAT16 for name, t in io_types.items() if name.startswith(("past", "present")))
    ops = {(n.domain, n.op_type) for n in model.graph.node}
    assert ("com.microsoft", "SkipSimplifiedLayerNormalization") in ops  # RMSNorm accumulates in float32
    # expert weights are float16 too, sliced per expert; the routers stay float32
    blocks = tuple(entry["experts_module"].rpartition(".")[0] + "." for entry in record["moe_layers"])
    float32 = [t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    assert float32 and all(name.startswith(blocks) for name in float32), float32
    assert record["verification"]["max_abs_logit_diff"] <= record["verification"]["tolerance"]


def test_float16_artifact_on_cpu_matches_the_cpu_artifact(sample_artifact, sample_cuda):
    """The same prompts, batched with left padding, then greedy generation on the trained sample."""
    cpu, gpu_build = Artifact(sample_artifact), Artifact(sample_cuda)
    assert gpu_build.session.get_providers() == ["CPUExecutionProvider"] or gpu_build.device == "cuda"
    tokenizer = Tokenizer(SAMPLE)
    prompts = [tokenizer.encode("def main("), tokenizer.encode("import numpy as np\nx = ")]
    within_float16_tolerance(logits(gpu_build, prompts), logits(cpu, prompts))
    expected = [int(t[0]) for t in generate(cpu, [prompts[0]], 16)]
    assert [int(t[0]) for t in generate(gpu_build, [prompts[0]], 16)] == expected and len(set(expected)) > 1


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v3", "gpt_oss", "qwen3_next", "deepseek_v4", "ergo"])
def test_float16_artifact_of_other_layouts_matches_cpu(compiled, arch, tmp_path):
    """Shared experts, sigmoid scoring with a score bias, expert biases with a clamped SwiGLU,
    linear attention whose recurrence (a Scan) and state stay float32, compressed attention's
    window buffers and entries carried in float16 (DeepSeek-V4), a norm scaled per route (Ergo's
    per-expert norm)."""
    c = compiled(arch)
    moec.compile(c.model_dir, tmp_path / "cuda", target="cuda", progress=False)
    # prompts without a near-tied routing decision: float16 rounding of the router's input may flip
    # one (gpt-oss's [88, 12, 201] ties at its last token), which moves logits by more than any tolerance
    prompts = [[5, 17, 99, 3, 250, 41, 7], [40, 7, 150, 9]]
    within_float16_tolerance(logits(Artifact(tmp_path / "cuda"), prompts), logits(Artifact(c.artifact_dir), prompts))
    expected = [int(t[0]) for t in generate(Artifact(c.artifact_dir), [prompts[0]], 12)]
    assert [int(t[0]) for t in generate(Artifact(tmp_path / "cuda"), [prompts[0]], 12)] == expected
    # the family's router runs in float32 inside the float16 graph
    graph = onnx.load(str(tmp_path / "cuda" / "model.onnx"), load_external_data=False).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input]}
    types |= {t.name: t.data_type for t in graph.initializer}
    # the routers' top-k (a sparse-attention indexer's, DeepSeek-V4's, picks past entries in float16)
    constants = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer
                 if t.data_type == onnx.TensorProto.INT64 and t.data_location != onnx.TensorProto.EXTERNAL}
    routers = [n for n in graph.node if n.op_type == "TopK" and n.input[1] in constants
               and int(constants[n.input[1]].reshape(-1)[0]) == c.model.config.num_experts_per_tok]
    assert routers and all(types.get(n.input[0], onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT for n in routers)


@pytest.mark.xdist_group("sample")  # beside sample_cuda, whose trace of the sample it reuses
def test_two_bit_experts_are_stored_in_the_four_bit_container(tmp_path):
    """CUDA's MatMulNBits has 4 and 8 bits: 2-bit codes go in the 4-bit container, and the artifact
    still verifies against PyTorch carrying the same dequantized weights."""
    from moec.planner import DEFAULT_NON_EXPERT, save_plan

    plan = tmp_path / "plan.json"
    save_plan({"format": "moec-plan/1", "model": None, "experts": {"bits": [[2, 4, 8, 2] * 2] * 4},
               "non_expert": DEFAULT_NON_EXPERT, "quantization": {"method": "rtn", "group_size": 32}, "pruning": {}},
              plan)
    record = moec.compile(SAMPLE, tmp_path / "artifact", plan=plan, target="cuda", progress=False)
    quantization = record["quantization"]
    assert quantization["widths_in_larger_containers"] == {"2": 4}
    assert {e["bits"]: e["stored_bits"] for layer in quantization["experts"] for e in layer["experts"]} == \
        {2: 4, 4: 4, 8: 8}
    model = onnx.load(str(tmp_path / "artifact" / "model.onnx"), load_external_data=False)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert nbits and {a.i for n in nbits for a in n.attribute if a.name == "bits"} <= {4, 8}
    scales = {t.name: t.data_type for t in model.graph.initializer if t.name.endswith(".scales")}
    assert set(scales.values()) == {onnx.TensorProto.FLOAT16}
    assert record["verification"]["max_abs_logit_diff"] <= record["verification"]["tolerance"]
    assert len(list(generate(Artifact(tmp_path / "artifact"), [[5, 17, 99]], 4))) == 4


def test_cuda_extra_pulls_onnxruntime_gpu_and_the_base_install_stays_cpu():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(d.startswith("onnxruntime-gpu") for d in project["optional-dependencies"]["cuda"])
    assert not any(d.startswith("onnxruntime-gpu") for d in project["dependencies"])
