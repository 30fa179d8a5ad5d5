"""Shared fixtures: each family's tiny model is saved and compiled once per test session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
    """compiled(arch) -> Compiled, building each family's artifact on first use."""
    import moec

    cache: dict[str, Compiled] = {}

    def get(arch: str) -> Compiled:
        if arch not in cache:
            root = tmp_path_factory.mktemp(arch)
            model = tiny.save_tiny(arch, root / "model")
            record = moec.compile(root / "model", root / "artifact", progress=False)
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
