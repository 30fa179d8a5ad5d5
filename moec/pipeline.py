"""compile(): checkpoint → adapter → traced graph → passes → target lowering → artifact.

The artifact is built in a staging folder beside the output and moved into place only after
it passed onnx.checker and the numeric check against transformers, so a failed or
interrupted compile never leaves a half-written artifact (nor removes the previous one).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

import moec
from moec.checkpoint import open_checkpoint
from moec.errors import MoecError
from moec.runtime import MODEL_FILE, RECORD_FILE, Artifact

EXTERNAL_DATA_FILE = MODEL_FILE + ".data"
VERIFY_TOLERANCE = 1e-3  # max |logit difference| a float artifact may show against transformers


@contextmanager
def staging_folder(out: Path, force: bool):
    """Yield a fresh folder beside `out`; on success it replaces `out`, on failure it is removed."""
    if out.exists() and not force:
        raise MoecError(f"output folder {out} exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield staging
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(old / out.name)
            staging.rename(out)
            shutil.rmtree(old)
        else:
            staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class _Stages:
    """A progress bar over the named compile stages, with the time each took."""

    def __init__(self, names: list[str], show: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=len(names), disable=not show, unit="stage", leave=False,
                        bar_format="{desc} [{n_fmt}/{total_fmt}] {elapsed}")
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        self.bar.set_description(name)
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 3)
        self.bar.update()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()


def verification_input(vocab_size: int, tokens: int = 8) -> np.ndarray:
    return np.random.default_rng(0).integers(0, vocab_size, (1, tokens), dtype=np.int64)


def compile(model_dir: str | Path, out: str | Path, *, force: bool = False, target: str = "cpu",
            progress: bool = True) -> dict:
    """Compile a Hugging Face MoE checkpoint folder into an ONNX artifact folder; returns moec.json."""
    import onnx
    import onnx_ir as ir
    import torch

    from moec import trace
    from moec.adapters import adapter_for
    from moec.checkpoint import load_model
    from moec.targets import get_target

    checkpoint = open_checkpoint(model_dir)
    target_module = get_target(target)
    out = Path(out)
    stage_names = ["load", "reference", "trace", "lower", "save", "check", "verify"]
    with staging_folder(out, force) as staging, _Stages(stage_names, progress) as stages:
        with stages.stage("load"):
            model = load_model(checkpoint)
            adapter = adapter_for(model.config)
        with stages.stage("reference"), torch.no_grad():
            probe = verification_input(model.config.vocab_size)
            reference = model(torch.from_numpy(probe)).logits.float().numpy()
        with stages.stage("trace"):
            blocks = trace.swap_moe_blocks(model, adapter)
            if not blocks:
                raise MoecError(f"{checkpoint.path}: the model has no sparse MoE layers")
            graph = trace.trace(model)
        with stages.stage("lower"):
            for p in target_module.passes():
                p(graph)
            graph.metadata_props.update({"moec.version": moec.__version__,
                                         "moec.source_model": str(checkpoint.path),
                                         "moec.model_type": checkpoint.model_type,
                                         "moec.target": target})
        with stages.stage("save"):
            ir.save(graph, staging / MODEL_FILE, external_data=EXTERNAL_DATA_FILE)
            shutil.copy2(checkpoint.path / "config.json", staging / "config.json")
            for f in checkpoint.tokenizer_files():
                shutil.copy2(f, staging / f.name)
        with stages.stage("check"):
            onnx.checker.check_model(str(staging / MODEL_FILE), full_check=True)
        record = build_record(checkpoint, blocks, graph, staging, target, model.config)
        (staging / RECORD_FILE).write_text(json.dumps(record, indent=2))
        with stages.stage("verify"):
            artifact = Artifact(staging, providers=list(target_module.PROVIDERS))
            mask = np.ones_like(probe)
            logits, _ = artifact.forward(probe, mask, np.arange(probe.shape[1])[None],
                                         artifact.empty_cache(1))
            diff = float(np.abs(logits - reference).max())
            record["verification"] = {"max_abs_logit_diff": diff, "tolerance": VERIFY_TOLERANCE,
                                      "tokens": int(probe.size), "against": "transformers fp32"}
            if not diff <= VERIFY_TOLERANCE:
                raise MoecError(f"verification failed: artifact logits differ from transformers by "
                                f"{diff:.3g} (tolerance {VERIFY_TOLERANCE})")
        record["seconds"] = stages.seconds
        (staging / RECORD_FILE).write_text(json.dumps(record, indent=2))
    return record


def build_record(checkpoint, blocks, graph, folder: Path, target: str, config) -> dict:
    """moec.json: what was built from what, and how big it is."""
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    expert_params = sum(int(b.gate.numel() + b.up.numel() + b.down.numel()) for b in blocks)
    return {
        "format": "moec-artifact/1",
        "moec_version": moec.__version__,
        "source_model": {"path": str(checkpoint.path.resolve()), "model_type": checkpoint.model_type,
                         "weight_bytes": checkpoint.weight_bytes},
        "target": target,
        "opset": graph.opset_imports.get("", None),
        "num_layers": config.num_hidden_layers,
        "moe_layers": [
            {"layer": b.spec.layer, "num_experts": b.num_experts, "routing": b.spec.attributes(),
             "shared_expert": b.shared is not None}
            for b in blocks
        ],
        "parameters": {"experts": expert_params,
                       "total": int(sum(t.const_value.size for t in graph.graph.initializers.values()
                                        if t.const_value is not None))},
        "bytes": {"model.onnx": files.get(MODEL_FILE, 0),
                  "external_data": files.get(EXTERNAL_DATA_FILE, 0),
                  "total": files.get(MODEL_FILE, 0) + files.get(EXTERNAL_DATA_FILE, 0)},
        "files": sorted(files),
    }
