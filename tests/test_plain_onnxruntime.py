"""samples/ort_generate.py, the no-moec template for applications, generates exactly what
`moec run` does: on the bundled sample and on families with other layouts (shared experts,
DeepSeek's compressed MLA cache)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from moec.runtime import Artifact, Tokenizer, generate

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


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_template_matches_moec_run_on_other_families(compiled, arch):
    artifact = compiled(arch).artifact_dir
    prompt = [5, 17, 99, 3, 250, 41]
    expected = moec_tokens(artifact, prompt, 16)
    assert template().generate(artifact, prompt, 16) == expected and len(set(expected)) > 1
