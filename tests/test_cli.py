"""The `moec` command: bad inputs fail cleanly, artifacts run and inspect, runtime needs no torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from moec.cli import main
from moec.runtime import Artifact, Tokenizer, generate


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *words):
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("moec: error:"), err
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture
def model_dir(compiled):
    return compiled("mixtral").model_dir


def copy_model(model_dir, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(model_dir, target)
    return target


def test_missing_folder(capsys, tmp_path):
    code, _, err = run_cli(capsys, "compile", tmp_path / "nope", "--out", tmp_path / "out")
    assert_one_line_error(code, err, "not found")
    assert not (tmp_path / "out").exists()


def test_no_safetensors_refuses_pickle(capsys, tmp_path, model_dir):
    model = copy_model(model_dir, tmp_path)
    for f in model.glob("*.safetensors"):
        f.unlink()
    (model / "pytorch_model.bin").write_bytes(b"not loaded")
    code, _, err = run_cli(capsys, "compile", model, "--out", tmp_path / "out")
    assert_one_line_error(code, err, "safetensors", "pytorch_model.bin")
    assert not (tmp_path / "out").exists()


def test_unsupported_model_type(capsys, tmp_path, model_dir):
    model = copy_model(model_dir, tmp_path)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    code, _, err = run_cli(capsys, "compile", model, "--out", tmp_path / "out")
    assert_one_line_error(code, err, "'llama'", "no sparse MoE layers")


def test_corrupt_config(capsys, tmp_path, model_dir):
    model = copy_model(model_dir, tmp_path)
    (model / "config.json").write_text('{"model_type": "mixtral", ')
    code, _, err = run_cli(capsys, "compile", model, "--out", tmp_path / "out")
    assert_one_line_error(code, err, "config.json", "not valid JSON")


@pytest.mark.parametrize("linked", ["model.safetensors", "config.json", "tokenizer.json"])
def test_symlink_out_of_the_model_folder_is_refused(capsys, tmp_path, model_dir, linked):
    model = copy_model(model_dir, tmp_path)
    outside = tmp_path / "elsewhere" / linked
    outside.parent.mkdir()
    (model / linked).rename(outside)
    (model / linked).symlink_to(outside)
    code, _, err = run_cli(capsys, "compile", model, "--out", tmp_path / "out")
    assert_one_line_error(code, err, linked, "outside the model folder")
    assert not (tmp_path / "out").exists()


def test_hugging_face_cache_layout_is_accepted(capsys, tmp_path, model_dir):
    """The hub cache links each snapshot file into the repository's blobs/: that stays allowed."""
    repo = tmp_path / "models--tiny--mixtral"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in model_dir.iterdir():
        blob = repo / "blobs" / f"blob-{f.name}"
        shutil.copy2(f, blob)
        (snapshot / f.name).symlink_to(blob)
    code, _, err = run_cli(capsys, "compile", snapshot, "--out", tmp_path / "out", "--quiet")
    assert code == 0, err
    assert (tmp_path / "out" / "model.onnx").is_file()


def test_code_in_a_model_folder_is_never_run(capsys, tmp_path, model_dir):
    """A config whose auto_map points at Python files in the folder: the file is not imported."""
    model = copy_model(model_dir, tmp_path)
    marker = tmp_path / "executed"
    (model / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.Config", "AutoModelForCausalLM": "evil.Model"}
    (model / "config.json").write_text(json.dumps(config))
    run_cli(capsys, "compile", model, "--out", tmp_path / "out", "--quiet")
    run_cli(capsys, "calibrate", model, "--samples", "2", "--seq-len", "16", "--out", tmp_path / "stats.json", "--quiet")
    assert not marker.exists()


def test_malformed_plan_stops_the_compile_before_anything_is_written(capsys, tmp_path, model_dir):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"format": "moec-plan/1", "model": None, "experts": {"bits": [[2, "x"]]},
                                "non_expert": {}, "quantization": {"method": "rtn", "group_size": 32},
                                "pruning": {}}))
    code, _, err = run_cli(capsys, "compile", model_dir, "--plan", plan, "--out", tmp_path / "out")
    assert_one_line_error(code, err, "experts.bits[0][1]")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]


def test_existing_output_needs_force(capsys, tmp_path, model_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous artifact")
    code, _, err = run_cli(capsys, "compile", model_dir, "--out", out)
    assert_one_line_error(code, err, "exists", "--force")
    assert (out / "keep.txt").read_text() == "previous artifact"

    code, stdout, _ = run_cli(capsys, "compile", model_dir, "--out", out, "--force", "--quiet")
    assert code == 0 and "max logit diff" in stdout
    assert not (out / "keep.txt").exists() and (out / "model.onnx").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "no staging folders left behind"


def test_failed_compile_leaves_previous_artifact(capsys, tmp_path, model_dir):
    """A compile that fails midway (here: weights that do not fit the config) changes nothing."""
    model = copy_model(model_dir, tmp_path)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "hidden_size": config["hidden_size"] * 2}))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous artifact")
    code, _, err = run_cli(capsys, "compile", model, "--out", out, "--force", "--quiet")
    assert_one_line_error(code, err, "checkpoint gives shape [64], model expects [128]")
    assert (out / "keep.txt").read_text() == "previous artifact"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out"]


def test_run_streams_the_greedy_tokens(capsys, compiled):
    artifact_dir = compiled("mixtral").artifact_dir
    code, out, _ = run_cli(capsys, "run", artifact_dir, "--prompt", "def main(", "--max-new-tokens", 12, "--json")
    assert code == 0
    result = json.loads(out)
    tokenizer = Tokenizer(artifact_dir)
    expected = [int(t[0]) for t in generate(Artifact(artifact_dir), [tokenizer.encode("def main(")], 12)]
    assert result["generated_ids"] == expected and len(expected) == 12
    code, out, _ = run_cli(capsys, "run", artifact_dir, "--prompt", "def main(", "--max-new-tokens", 12)
    assert code == 0 and out == "def main(" + tokenizer.decode(expected) + "\n"


def test_run_rejects_non_artifact(capsys, tmp_path):
    code, _, err = run_cli(capsys, "run", tmp_path, "--prompt", "x")
    assert_one_line_error(code, err, "not a moec artifact")


def test_inspect(capsys, compiled):
    c = compiled("qwen2_moe")
    code, out, _ = run_cli(capsys, "inspect", c.artifact_dir)
    assert code == 0 and "qwen2_moe" in out and "2 MoE: 0, 2" in out and "6 per layer" in out
    assert "appended in place in 3 layers (0-2: GroupQueryAttention)" in out
    code, out, _ = run_cli(capsys, "inspect", c.artifact_dir, "--json")
    info = json.loads(out)
    assert info["moe_layers"] == [0, 2] and info["experts_per_layer"] == [6]
    assert info["kv_in_place"] == c.record["kv_in_place"] and len(info["kv_in_place"]) == 6
    assert info["bytes"]["total"] == c.record["bytes"]["total"]
    # every stored byte is in some part: the initializers' lengths add up to the external data (plus the
    # few inline constants, which live in model.onnx)
    parts = info["size_breakdown"]
    assert {"routed experts", "attention", "shared experts", "dense MLPs", "embeddings", "lm_head"} <= set(parts)
    assert info["bytes"]["external_data"] <= sum(parts.values()) <= info["bytes"]["total"]


def test_inspect_plots_bits_and_sizes(capsys, compiled, tmp_path):
    import matplotlib.image

    code, out, _ = run_cli(capsys, "inspect", compiled("mixtral").artifact_dir, "--plot", tmp_path / "bits.png")
    assert code == 0 and "size by part" in out and "pruning      none" in out
    assert matplotlib.image.imread(tmp_path / "bits.png").shape[:2] == (540, 1320)


def test_inspect_serves_the_graph_in_netron(compiled):
    import socket
    import urllib.request

    import netron

    from moec.summary import serve_netron

    with socket.socket() as probe:  # a free port
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    address = serve_netron(compiled("mixtral").artifact_dir, port)
    try:
        with urllib.request.urlopen(f"http://{address[0]}:{address[1]}/", timeout=10) as response:
            assert response.status == 200 and b"netron" in response.read().lower()
    finally:
        netron.stop(address)


def test_artifact_metadata_says_what_was_built(compiled):
    import onnx

    c = compiled("mixtral")
    props = {p.key: p.value for p in onnx.load(str(c.artifact_dir / "model.onnx"), load_external_data=False)
             .metadata_props}
    assert props["moec.model_type"] == "mixtral" and props["moec.avg_expert_bits"] == "32 (float)"
    assert props["moec.pruning"] == "none" and props["moec.version"] == c.record["moec_version"]


@pytest.mark.parametrize("command", ["compile", "run", "inspect", "plan", "bench", "eval", "calibrate", "profile"])
def test_help(command):
    result = subprocess.run([sys.executable, "-m", "moec", command, "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "usage: moec " + command in result.stdout


def test_bench_reports_speed_and_memory(capsys, compiled):
    code, out, _ = run_cli(capsys, "bench", compiled("mixtral").artifact_dir, "--prompt-len", 8, "--gen-len", 4,
                           "--repeats", 2, "--warmup", 0, "--json")
    result = json.loads(out)
    assert code == 0 and result["prompt_len"] == 8 and result["gen_len"] == 4 and result["pruning"] == "none"
    assert result["prefill_tok_s"] > 0 and result["decode_tok_s"] > 0 and result["ttft_ms"] > 0
    assert result["peak_rss_mb"] > 10 and "pruned_fraction" not in result
    code, out, _ = run_cli(capsys, "bench", compiled("mixtral").artifact_dir, "--prompt-len", 8, "--gen-len", 2,
                           "--repeats", 1)
    assert code == 0 and "decode" in out and "peak RSS" in out


def test_bench_on_text_feeds_the_texts_tokens(capsys, compiled, tmp_path, monkeypatch):
    """`moec bench --data`: the prompt is the text's first tokens and every decode step feeds the
    text's next one (routing as on the text), whatever the model picks; a text too short is refused."""
    from moec.runtime import Artifact, Tokenizer

    artifact_dir = compiled("mixtral").artifact_dir
    text = tmp_path / "text.txt"
    text.write_text("def route(tokens, experts):\n    return sorted(experts)[:2]\n" * 4)
    fed, forward = [], Artifact.forward
    monkeypatch.setattr(Artifact, "forward", lambda self, ids, *a, **k: (fed.append(ids[0].tolist()),
                                                                        forward(self, ids, *a, **k))[1])
    code, out, _ = run_cli(capsys, "bench", artifact_dir, "--prompt-len", 6, "--gen-len", 5, "--repeats", 1,
                           "--warmup", 0, "--data", text, "--json")
    ids = Tokenizer(artifact_dir).encode(text.read_text())
    assert code == 0 and json.loads(out)["data"] == str(text)
    assert fed == [ids[:6]] + [[token] for token in ids[6:11]]
    code, _, err = run_cli(capsys, "bench", artifact_dir, "--prompt-len", 600, "--gen-len", 5, "--data", text)
    assert code == 2 and "fewer than the 605 the prompt and decode take" in err


def test_runtime_does_not_import_torch(compiled):
    """`moec run` and `moec bench` (the deployment side) must work without PyTorch or transformers."""
    artifact_dir = compiled("mixtral").artifact_dir
    script = ("import sys; from moec.cli import main; "
              f"code = main(['run', {str(artifact_dir)!r}, '--prompt', 'ab', '--max-new-tokens', '3']); "
              "assert code == 0; "
              f"code = main(['bench', {str(artifact_dir)!r}, '--prompt-len', '4', '--gen-len', '2', '--repeats', '1']); "
              "assert code == 0; "
              "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
              "assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_a_transformers_outside_the_tested_range_is_named_in_one_warning_line(capsys, monkeypatch, tmp_path):
    """A user may override the lock with a newer transformers (docs/compatibility.md): moec says so
    once, in one line, and goes on (verification decides whether the model compiles)."""
    import importlib.metadata
    from pathlib import Path

    sample = Path(__file__).resolve().parents[1] / "samples" / "tiny-mixtral"
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "99.0.0" if name == "transformers" else real(name))
    code, _, err = run_cli(capsys, "compile", sample, "--out", tmp_path / "a", "--target", "nope")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 2, err
    assert lines[0].startswith("moec: warning: transformers 99.0.0 is outside the versions moec was tested with")
    assert lines[1].startswith("moec: error: unknown target")
    monkeypatch.setattr(importlib.metadata, "version", real)
    code, _, err = run_cli(capsys, "compile", sample, "--out", tmp_path / "a", "--target", "nope")
    assert "warning" not in err
