"""The walls: the planner is numpy/scipy, the runtime side never needs torch or transformers, and
passes speak the MoE node's vocabulary, not the front end's.

Static: every import statement a module holds (those inside functions too, which the package uses
to load heavy libraries late) and those of the moec modules it reaches, found with `ast` and
resolved with importlib (passes/, ops/ and targets/ are installed as moec.passes, moec.ops and
moec.targets, a layout import-linter's graph builder does not follow). Dynamic: the commands that
run an artifact, run for real in a fresh interpreter with torch and transformers installed.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from functools import cache

import pytest

FRONT_END = ("moec.pipeline", "moec.trace", "moec.experts", "moec.reference", "moec.linear_attention",
             "moec.weights", "moec.checkpoint", "moec.calibrate", "moec.gptq")
PYTORCH = ("torch", "transformers", "accelerate")


@cache
def direct_imports(module: str) -> frozenset[str]:
    """The modules `module`'s source imports anywhere in it, by absolute name."""
    spec = importlib.util.find_spec(module)
    tree = ast.parse(open(spec.origin).read())
    package = module if spec.submodule_search_locations else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level \
                else node.module
            submodules = {f"{base}.{alias.name}" for alias in node.names if base.startswith("moec")}
            submodules = {name for name in submodules if _is_module(name)}
            found.update(submodules or {base})
    return frozenset(found)


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def reachable(module: str) -> set[str]:
    """Every module `module` imports, directly or through the moec modules it imports. The
    package's own __init__ is not followed: it imports moec.errors, and the compiler only when
    `moec.compile` is used (checked by running it: test_import_moec_planner_loads_no_runtime)."""
    seen, todo = set(), [module]
    while todo:
        for name in direct_imports(todo.pop()):
            if name not in seen:
                seen.add(name)
                if name.startswith("moec") and name != "moec" and _is_module(name):
                    todo.append(name)
    return seen


def offending(module: str, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(name for name in reachable(module)
                  if any(name == f or name.startswith(f + ".") for f in forbidden))


def moec_modules(package: str) -> list[str]:
    import pkgutil

    spec = importlib.util.find_spec(package)
    return [f"{package}.{m.name}" for m in pkgutil.iter_modules(spec.submodule_search_locations)]


def test_the_planner_needs_neither_onnxruntime_nor_torch():
    assert offending("moec.planner", ("onnxruntime", "onnx", "onnx_ir", "onnxscript", *PYTORCH)) == []


def test_the_runtime_needs_neither_torch_nor_transformers():
    assert offending("moec.runtime", PYTORCH) == []


@pytest.mark.parametrize("module", moec_modules("moec.passes"))
def test_passes_import_no_front_end_module(module):
    assert offending(module, FRONT_END + PYTORCH) == []


def test_the_check_sees_a_violation(tmp_path, monkeypatch):
    """The static check is not vacuous: a module importing the front end inside a function is caught."""
    (tmp_path / "moec_wall_probe.py").write_text("def f():\n    from moec.trace import trace\n")
    monkeypatch.syspath_prepend(tmp_path)
    assert "moec.trace" in offending("moec_wall_probe", FRONT_END)
    assert "torch" in offending("moec_wall_probe", PYTORCH)  # through moec.trace's own imports


LOADED = """
import json, sys
from moec.cli import main
code = main(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    json.dump({"code": code, "modules": sorted(m for m in sys.modules if m.split(".")[0] in %r)}, f)
""" % (PYTORCH + ("onnxruntime",),)


def command_modules(tmp_path, *args) -> tuple[int, list[str]]:
    """Run `moec ARGS` in a fresh interpreter; its exit code and which of torch, transformers,
    accelerate and onnxruntime it loaded."""
    report = tmp_path / "loaded.json"
    subprocess.run([sys.executable, "-c", LOADED, str(report), *map(str, args)], check=True,
                   capture_output=True, timeout=300)
    result = json.loads(report.read_text())
    return result["code"], sorted({m.split(".")[0] for m in result["modules"]})


def test_import_moec_planner_loads_no_runtime(tmp_path):
    code = "import sys, moec.planner; print(sorted({m.split('.')[0] for m in sys.modules} & %r))" % \
        ({"onnxruntime", "torch", "transformers", "onnx"},)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"


def test_commands_on_an_artifact_load_neither_torch_nor_transformers(compiled, tmp_path):
    artifact = compiled("mixtral").artifact_dir
    text = tmp_path / "text.txt"
    text.write_text("Experts route tokens. " * 40)
    for args in (["run", artifact, "--prompt", "def f(", "--max-new-tokens", 2],
                 ["bench", artifact, "--prompt-len", 4, "--gen-len", 2, "--repeats", 1, "--warmup", 0, "--json"],
                 ["inspect", artifact, "--json"],
                 ["eval", artifact, "--data", text, "--samples", 2, "--seq-len", 16, "--json"]):
        code, loaded = command_modules(tmp_path, *args)
        assert code == 0, args
        assert loaded == ["onnxruntime"], (args[0], loaded)
