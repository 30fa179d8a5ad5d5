"""Shared fixtures: each family's tiny model is saved and compiled once per test session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import inspect
import re

import pytest
import torch

import tiny

torch.set_num_threads(2)


@dataclass
class Compiled:
    arch: str
    model: torch.nn.Module   # the transformers model, untouched
    model_dir: Path
    artifact_dir: Path
    record: dict


@pytest.fixture(scope="session")
def compiled(tmp_path_factory):
    """compiled(arch) -> Compiled, building each family's artifact on first use. A supported family
    that compile refuses (a transformers release changed it) fails its tests saying
    "refused (reason code)", which bench/compat.py reads."""
    import moec
    from moec.errors import Unsupported

    cache: dict[str, Compiled] = {}

    def get(arch: str) -> Compiled:
        if arch not in cache:
            root = tmp_path_factory.mktemp(arch)
            model = tiny.save_tiny(arch, root / "model")
            try:
                record = moec.compile(root / "model", root / "artifact", progress=False)
            except Unsupported as e:
                pytest.fail(f"refused ({e.reason}): {e}", pytrace=False)
            cache[arch] = Compiled(arch, model, root / "model", root / "artifact", record)
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def sample_artifact(tmp_path_factory):
    """The bundled sample checkpoint (samples/tiny-mixtral) compiled in float, once per session."""
    import moec

    out = tmp_path_factory.mktemp("sample") / "artifact"
    moec.compile(Path(__file__).resolve().parents[1] / "samples" / "tiny-mixtral", out, progress=False)
    return out


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(items):
    """A test that compiles a family's tiny model (its `arch` parameter, or a literal
    compiled("...") in its body or in a fixture it uses) runs in that family's xdist group, and the
    tests of the bundled sample in one group: tracing is most of a model's time, and each worker
    would trace it once more."""
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if item.get_closest_marker("xdist_group"):
            continue
        if {"sample_artifact", "sample_cuda"} & set(fixtures):  # the bundled sample, compiled once
            item.add_marker(pytest.mark.xdist_group("sample"))
            continue
        if "compiled" not in fixtures:
            continue
        callspec = getattr(item, "callspec", None)
        arch = callspec.params.get("arch") if callspec else None
        if arch is None:
            functions = [item.function, *(defs[-1].func for defs in item._fixtureinfo.name2fixturedefs.values())]
            source = "".join(inspect.getsource(f) for f in functions if inspect.isfunction(f))
            found = re.search(r'compiled\("(\w+)"\)', source)
            arch = found[1] if found else None
        if arch:
            item.add_marker(pytest.mark.xdist_group(arch))


def pytest_configure(config):
    """Stop when xdist would ignore the test groups: it tags each grouped test by rewriting
    `item._nodeid`, which pytest 9.2 no longer reads, and then each worker traces every family and
    the suite outgrows CI's time."""
    if config.getoption("dist", None) != "loadgroup":
        return
    probe = object.__new__(pytest.Function)
    probe._nodeid = "probe@group"
    try:
        tagged = probe.nodeid == "probe@group"
    except AttributeError:
        tagged = False
    if not tagged:
        raise pytest.UsageError(f"pytest-xdist cannot group tests under pytest {pytest.__version__}; "
                                "install with -c constraints.txt")
