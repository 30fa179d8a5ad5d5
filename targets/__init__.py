"""Compilation targets: the passes that lower the traced graph for one execution provider."""

from types import ModuleType

from moec.errors import MoecError

from . import cpu, cuda

TARGETS: dict[str, ModuleType] = {cpu.NAME: cpu, cuda.NAME: cuda}


def get_target(name: str) -> ModuleType:
    if name not in TARGETS:
        raise MoecError(f"unknown target {name!r}; available: {', '.join(TARGETS)}")
    return TARGETS[name]
