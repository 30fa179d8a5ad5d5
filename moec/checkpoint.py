"""A local Hugging Face checkpoint folder: validated before anything is loaded.

Safetensors only (no pickle is ever loaded), no remote code, no hub access.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from moec.errors import MoecError

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
    def weight_files(self) -> list[Path]:
        return sorted(self.path.glob("*.safetensors"))

    @property
    def weight_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.weight_files)

    def tokenizer_files(self) -> list[Path]:
        return [self.path / n for n in TOKENIZER_FILES if (self.path / n).is_file()]


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
    if not checkpoint.weight_files:
        pickled = [f.name for f in path.iterdir() if f.suffix in PICKLE_SUFFIXES]
        hint = (f" (found {', '.join(sorted(pickled))}: moec never loads pickle files; "
                "convert them to safetensors)") if pickled else ""
        raise MoecError(f"no .safetensors weights in {path}{hint}")
    return checkpoint


def load_model(checkpoint: Checkpoint):
    """The transformers model in fp32, eval mode, from safetensors, without remote code."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        config = AutoConfig.from_pretrained(checkpoint.path, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(
            checkpoint.path, config=config, dtype=torch.float32, use_safetensors=True,
            trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MoecError(f"cannot load {checkpoint.path}: {first_line}") from None
    return model.eval()


def _check_inside(file: Path, folder: Path) -> None:
    """A file moec reads must resolve inside the model folder; a symlink out of it is refused,
    except Hugging Face's cache layout (snapshots/<revision>/ linking into the repository's blobs/)."""
    target, root = file.resolve(), folder.resolve()
    allowed = [root] + ([root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [])
    if not any(target.is_relative_to(place) for place in allowed):
        raise MoecError(f"{file} links to {target}, outside the model folder {folder}: "
                        "moec reads only files inside it")
