"""A local Hugging Face checkpoint folder: validated before anything is loaded.

Safetensors only (no pickle is ever loaded), no remote code, no hub access. Weights are floating
point, or in one of the quantized formats large MoE models are published in (PUBLISHED_FORMATS),
which moec.weights dequantizes as it reads them.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

from moec.errors import MoecError

# quantization_config.quant_method of the published quantized formats moec reads -> what they store
PUBLISHED_FORMATS = {"fp8": "float8_e4m3fn weights with block scales (DeepSeek-V3/R1, Kimi-K2, Qwen3 and GLM FP8)",
                     "mxfp4": "MXFP4 experts, e2m1 codes with E8M0 block exponents (gpt-oss)"}
# formats refused with a reason: their int4 codes are already a quantization, which moec would redo on top
REQUANTIZED = ("gptq", "awq")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")


@dataclass
class Checkpoint:
    path: Path
    config: dict

    @property
    def model_type(self) -> str:
        return self.config.get("model_type", "")

    @property
    def quant_method(self) -> str | None:
        """The published quantized format the weights are stored in, None for floating point."""
        return (self.config.get("quantization_config") or {}).get("quant_method")

    @property
    def weight_files(self) -> list[Path]:
        return sorted(self.path.glob("*.safetensors"))

    @property
    def weight_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.weight_files)

    def tokenizer_files(self) -> list[Path]:
        return [self.path / n for n in TOKENIZER_FILES if (self.path / n).is_file()]


class UntestedTransformers(UserWarning):
    """The installed transformers lies outside the range moec's suite passed on (pyproject.toml's)."""


def _warn_if_untested_transformers() -> None:
    """A user may install a transformers newer than moec was tested with (docs/compatibility.md);
    the release may have changed a family, which verification then catches."""
    from importlib.metadata import PackageNotFoundError, requires, version

    from packaging.requirements import Requirement

    try:
        tested = next(r.specifier for r in map(Requirement, requires("moec") or []) if r.name == "transformers")
    except (PackageNotFoundError, StopIteration):  # run from a source tree, not installed
        return
    installed = version("transformers")
    if not tested.contains(installed, prereleases=True):
        warnings.warn(f"transformers {installed} is outside the versions moec was tested with ({tested}): every "
                      "compile verifies prefill and cached decode against it, so a family it changed is refused "
                      "or fails verification rather than written wrong", UntestedTransformers, stacklevel=3)


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Check the folder, its config.json and its weights; raise MoecError naming the problem."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    path = Path(path)
    if not path.is_dir():
        raise MoecError(f"model folder not found: {path}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise MoecError(f"{path} has no config.json; expected a Hugging Face model folder")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MoecError(f"{config_file} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise MoecError(f"{config_file} must hold a JSON object")
    checkpoint = Checkpoint(path, config)
    for file in [config_file, *path.glob("*.safetensors"), *path.glob("*.json"), *checkpoint.tokenizer_files()]:
        _check_inside(file, path)
    if checkpoint.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise MoecError(f"unsupported model_type {checkpoint.model_type!r} in {config_file}: transformers has no "
                        "causal language model of that type")
    _check_format(checkpoint, config_file)
    _warn_if_untested_transformers()
    if not checkpoint.weight_files:
        pickled = [f.name for f in path.iterdir() if f.suffix in PICKLE_SUFFIXES]
        hint = (f" (found {', '.join(sorted(pickled))}: moec never loads pickle files; "
                "convert them to safetensors)") if pickled else ""
        raise MoecError(f"no .safetensors weights in {path}{hint}")
    return checkpoint


def _check_format(checkpoint: Checkpoint, config_file: Path) -> None:
    quantization = checkpoint.config.get("quantization_config")
    if quantization is None:
        return
    method = quantization.get("quant_method") if isinstance(quantization, dict) else None
    if method in REQUANTIZED:
        raise MoecError(f"{config_file}: the weights are {method} int4 codes; moec quantizes a model itself "
                        "(per expert, to the plan's widths), so compile its floating-point or FP8 release instead")
    if method not in PUBLISHED_FORMATS:
        raise MoecError(f"{config_file}: quantization_config has quant_method {method!r}; moec reads floating-point "
                        f"checkpoints and the published formats {', '.join(PUBLISHED_FORMATS)}")


def load_model(checkpoint: Checkpoint):
    """The transformers model in fp32, eval mode, read as every moec command reads a checkpoint
    (moec.weights: safetensors only, published quantized formats dequantized)."""
    from moec.weights import StreamingModel

    stream = StreamingModel(checkpoint)
    stream.load("")
    return stream.model


def _check_inside(file: Path, folder: Path) -> None:
    """A file moec reads must resolve inside the model folder; a symlink out of it is refused,
    except Hugging Face's cache layout (snapshots/<revision>/ linking into the repository's blobs/)."""
    target, root = file.resolve(), folder.resolve()
    allowed = [root] + ([root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [])
    if not any(target.is_relative_to(place) for place in allowed):
        raise MoecError(f"{file} links to {target}, outside the model folder {folder}: "
                        "moec reads only files inside it")
