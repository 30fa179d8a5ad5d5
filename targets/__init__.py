"""Compilation targets: what an artifact for one execution provider is, as data.

A target names its providers, the containers its low-bit kernels store each width in, its
scales' float type, the tolerance its verification holds it to, the session options its artifacts
run with, and the passes that lower the traced graph for it, built from the quantization specs and
the routing changes (moec.policy) and run by onnx-ir's PassManager; each pass states its ordering needs as a
precondition (`requires`). Targets are plain data, so the planner's size model reads them too.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from moec.errors import MoecError

NAMES = ("cpu", "cuda")


@dataclass(frozen=True)
class Target:
    name: str
    providers: tuple[str, ...]
    # the kernel's container for each planned width (a 2-bit expert in a 4-bit container keeps its
    # codes and dequantized values, at twice the bytes)
    container_bits: Mapping[int, int]
    scale_bytes: int        # bytes of a quantization scale (the activations' float type)
    accuracy_level: int     # MatMulNBits' activations (4: int8 per block)
    # verification: max |logit difference| against the reference, with exact kernels: absolute, plus
    # this fraction of the reference's logit range
    verify_tolerance: float
    verify_relative_tolerance: float
    session_options: Mapping
    # (target, quantization specs by weight name, routing changes by layer) -> the passes, in order
    pass_list: Callable[..., list]
    # whether its lowering quantizes embedding tables to the plan's `embedding` width
    # (GatherBlockQuantized); where not, they stay in float
    quantized_embeddings: bool = False

    def passes(self, specs: Mapping, routing: Mapping) -> list:
        """The target's lowering, configured by the plan's data (for onnx-ir's PassManager)."""
        return self.pass_list(self, specs, routing)


def get_target(name: str) -> Target:
    if name not in NAMES:
        raise MoecError(f"unknown target {name!r}; available: {', '.join(NAMES)}")
    return importlib.import_module(f"moec.targets.{name}").TARGET
