"""onnxruntime-genai loads artifact folders as they are (genai_config.json written by compile)
and generates the same greedy tokens as `moec run`."""

from __future__ import annotations

import json

import pytest

from moec.runtime import Artifact, Tokenizer, generate

og = pytest.importorskip("onnxruntime_genai", reason="the test extra installs onnxruntime-genai")


def genai_tokens(artifact, prompt: list[int], count: int) -> list[int]:
    model = og.Model(str(artifact))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + count, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


def moec_tokens(artifact, prompt: list[int], count: int) -> list[int]:
    return [int(step[0]) for step in generate(Artifact(artifact), [prompt], count)]


def test_sample_generates_the_same_text_in_genai(sample_artifact):
    model = og.Model(str(sample_artifact))
    prompt = [int(t) for t in og.Tokenizer(model).encode("def main(")]
    assert prompt == Tokenizer(sample_artifact).encode("def main(")
    assert genai_tokens(sample_artifact, prompt, 24) == moec_tokens(sample_artifact, prompt, 24)
    # every layer appends to its cache in place, so genai keeps one buffer per past
    assert json.loads((sample_artifact / "genai_config.json").read_text())["search"]["past_present_share_buffer"]


@pytest.mark.parametrize("arch", ["qwen2_moe", "gpt_oss", "phimoe"])
def test_other_families_generate_the_same_tokens_in_genai(compiled, arch):
    artifact = compiled(arch).artifact_dir
    assert compiled(arch).record["onnxruntime_genai"]["config"] == "genai_config.json"
    prompt = [5, 17, 99, 3, 250, 41]
    expected = moec_tokens(artifact, prompt, 16)
    assert genai_tokens(artifact, prompt, 16) == expected and len(set(expected)) > 1
    shared = json.loads((artifact / "genai_config.json").read_text())["search"]["past_present_share_buffer"]
    assert shared == (arch != "gpt_oss")  # gpt-oss's attention (sinks) keeps concatenating its cache


def test_a_pruned_artifact_runs_in_genai_with_pruning_on(tmp_path, compiled):
    import moec
    from moec.planner import DEFAULT_NON_EXPERT, save_plan

    plan = tmp_path / "plan.json"
    save_plan({"format": "moec-plan/1", "model": None, "experts": {"bits": [["float"] * 4] * 2},
               "non_expert": {key: "float" for key in DEFAULT_NON_EXPERT},
               "quantization": {"method": "rtn", "group_size": 32},
               "pruning": {"layers": [{"layer": 0, "beta": 0.9}, {"layer": 1, "beta": 0.9}], "protect_fraction": 0.0}},
              plan)
    moec.compile(compiled("mixtral").model_dir, tmp_path / "artifact", plan=plan, progress=False)
    prompt = [5, 17, 99, 3, 250, 41]
    assert genai_tokens(tmp_path / "artifact", prompt, 16) == moec_tokens(tmp_path / "artifact", prompt, 16)


def test_deepseek_mla_cache_is_declared_unsupported(compiled):
    c = compiled("deepseek_v3")
    assert "one KV-cache layout" in c.record["onnxruntime_genai"]["unsupported"]
    assert not (c.artifact_dir / "genai_config.json").exists()
    json.loads((c.artifact_dir / "moec.json").read_text())  # the record on disk says so too


@pytest.mark.parametrize("arch, carried", [pytest.param(arch, carried, marks=pytest.mark.xdist_group(arch)) for
                                           arch, carried in (("qwen3_next", "conv, recurrent"),
                                                             ("deepseek_v32", "indexer_key"))])
def test_state_beyond_keys_and_values_is_declared_unsupported(compiled, arch, carried):
    """genai's decoder has key and value slots only; Qwen3-Next also carries conv and recurrent state,
    DeepSeek-V3.2 its indexer's keys."""
    c = compiled(arch)
    assert f"also carries {carried} (" in c.record["onnxruntime_genai"]["unsupported"]
    assert not (c.artifact_dir / "genai_config.json").exists()
