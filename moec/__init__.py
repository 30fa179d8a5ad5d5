"""moec: compress Mixture-of-Experts LLMs (MC-MoE) and compile them to ONNX for onnxruntime."""

__version__ = "0.1.0"

from moec.errors import MoecError  # noqa: E402

__all__ = ["MoecError", "compile", "__version__"]


def __getattr__(name: str):
    """`moec.compile` loads the compiler on first use, so importing the planner or the runtime
    never pulls in onnxruntime's graph tooling, torch or transformers."""
    if name == "compile":
        from moec.pipeline import compile

        return compile
    raise AttributeError(f"module 'moec' has no attribute {name!r}")
