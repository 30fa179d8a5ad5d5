"""samples/ort_generate.py, the no-moec template for applications, generates exactly what
`moec run` does: on the bundled sample and on families with other layouts (shared experts,
DeepSeek's compressed MLA cache, Qwen3-Next's linear-attention state)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from moec.runtime import Artifact, Tokenizer, generate
from moec.targets import get_target

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "samples" / "ort_generate.py"


def template():
    spec = importlib.util.spec_from_file_location("ort_generate", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def moec_tokens(artifact: Path, prompt: list[int], count: int) -> list[int]:
    return [int(step[0]) for step in generate(Artifact(artifact), [prompt], count)]


def test_template_imports_no_moec():
    source = SCRIPT.read_text()
    assert "import moec" not in source and "from moec" not in source


def test_template_matches_moec_run_on_the_sample(sample_artifact):
    prompt = Tokenizer(sample_artifact).encode("def main(")
    assert template().generate(sample_artifact, prompt, 32) == moec_tokens(sample_artifact, prompt, 32)
    run = subprocess.run([sys.executable, str(SCRIPT), str(sample_artifact), "--prompt", "def main(",
                          "--max-new-tokens", "32"], capture_output=True, text=True, check=True)
    tokenizer = Tokenizer(sample_artifact)
    assert run.stdout.rstrip("\n") == "def main(" + tokenizer.decode(moec_tokens(sample_artifact, prompt, 32))


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v3", "gpt_oss", "qwen3_next"])
def test_template_matches_moec_run_on_other_families(compiled, arch):
    artifact = compiled(arch).artifact_dir
    prompt = [5, 17, 99, 3, 250, 41]
    expected = moec_tokens(artifact, prompt, 16)
    assert template().generate(artifact, prompt, 16) == expected and len(set(expected)) > 1


def test_tuned_session_options_reach_every_runner(sample_artifact):
    """moec's runtime reads moec.json, plain onnxruntime the model's ort_config metadata (under
    ORT_LOAD_CONFIG_FROM_MODEL=1, which the template sets), onnxruntime-genai its config."""
    record = json.loads((sample_artifact / "moec.json").read_text())
    cpu = get_target("cpu")
    assert record["session_options"] == cpu.session_options and record["providers"] == list(cpu.providers)
    metadata = {p.key: p.value for p in onnx.load(str(sample_artifact / "model.onnx"),
                                                  load_external_data=False).metadata_props}
    assert json.loads(metadata["ort_config"]) == {"session_options": {
        "intra_op_num_threads": 0, "graph_optimization_level": int(ort.GraphOptimizationLevel.ORT_ENABLE_ALL)}}
    genai = json.loads((sample_artifact / "genai_config.json").read_text())["model"]["decoder"]["session_options"]
    assert genai["graph_optimization_level"] == "ORT_ENABLE_ALL" and genai["enable_cpu_mem_arena"] is True
    assert "ORT_LOAD_CONFIG_FROM_MODEL" in SCRIPT.read_text()


def test_kv_cache_stays_in_onnxruntime_and_matches_plain_runs(sample_artifact):
    """Artifact.forward binds each step's presents as the next past (OrtValues, no NumPy round trip);
    its logits equal session.run fed the same cache as NumPy arrays."""
    artifact = Artifact(sample_artifact)
    session = ort.InferenceSession(str(sample_artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    bound = artifact.empty_cache(1)
    plain = {name: value.numpy() for name, value in bound.items()}
    step, seen = np.array([[5, 17, 99, 3]]), 0
    for _ in range(4):
        total = seen + step.shape[1]
        mask, pos = np.ones((1, total), np.int64), np.arange(seen, total)[None]
        logits, bound = artifact.forward(step, mask, pos, bound)
        outputs = dict(zip(names, session.run(None, {"input_ids": step, "attention_mask": mask, "position_ids": pos,
                                                     **plain})))
        assert all(isinstance(value, ort.OrtValue) for value in bound.values())
        np.testing.assert_array_equal(logits, outputs["logits"])
        plain = {name: outputs[name.replace("past_key_values.", "present.")] for name in plain}
        seen, step = total, logits[:, -1].argmax(-1)[:, None]
