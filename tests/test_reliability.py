"""Builds are atomic and reproducible: a compile killed outright leaves the previous artifact
as it was (and its leftovers are cleaned by the next compile); two compiles are byte-identical."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

from moec.planner import DEFAULT_NON_EXPERT, save_plan

PLAN = {"format": "moec-plan/1", "model": None, "experts": {"bits": [[2, 4, 8, "float"]] * 2},
        "non_expert": DEFAULT_NON_EXPERT, "quantization": {"method": "rtn", "group_size": 32},
        "pruning": {"layers": [{"layer": 1, "beta": 0.5}], "protect_fraction": 0.0}}


def digests(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.name != "moec.json"}


def test_two_compiles_are_byte_identical(compiled, tmp_path):
    import moec

    plan = tmp_path / "plan.json"
    save_plan(PLAN, plan)
    for name in ("a", "b"):
        moec.compile(compiled("mixtral").model_dir, tmp_path / name, plan=plan, progress=False)
    assert digests(tmp_path / "a") == digests(tmp_path / "b")
    records = [json.loads((tmp_path / name / "moec.json").read_text()) for name in ("a", "b")]
    for record in records:
        record.pop("seconds")
    assert records[0] == records[1]


def test_a_killed_compile_leaves_the_previous_artifact(compiled, tmp_path):
    import moec

    model_dir = compiled("mixtral").model_dir
    out = tmp_path / "artifact"
    moec.compile(model_dir, out, progress=False)
    before = digests(out)
    process = subprocess.Popen([sys.executable, "-m", "moec", "compile", str(model_dir), "--out", str(out),
                                "--force", "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not [p for p in tmp_path.iterdir() if p.name.startswith(".artifact.partial-")]:
        assert process.poll() is None and time.monotonic() < deadline, "the compile ended before it was killed"
        time.sleep(0.05)
    time.sleep(1.0)  # well inside tracing
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert digests(out) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".artifact.partial-")]  # SIGKILL: no cleanup
    moec.compile(model_dir, out, force=True, progress=False)  # the next compile removes what was abandoned
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]
    assert digests(out) == before
