"""moec: compress Mixture-of-Experts LLMs (MC-MoE) and compile them to ONNX for onnxruntime."""

__version__ = "0.1.0"

from moec.errors import MoecError  # noqa: E402
from moec.pipeline import compile  # noqa: E402,A004

__all__ = ["MoecError", "compile", "__version__"]
