"""compile(): checkpoint → traced graph (transformers' code, experts as one node) → passes → target lowering → artifact.

The artifact is built in a staging folder beside the output and swapped into place only after
it passed onnx.checker and the numeric check, so a failed or interrupted compile never leaves a
half-written artifact (nor removes the previous one); see moec.files.staging_folder.
"""

from __future__ import annotations

import json
import shutil
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

from moec.checkpoint import open_checkpoint
from moec.errors import MoecError, error_chain
from moec.files import staging_folder
from moec.runtime import MODEL_FILE, RECORD_FILE


@contextmanager
def _checkpoint_errors_surfaced():
    """Weights are read lazily, deep inside torch.onnx, the optimizer and the writer, which wrap
    what they call; a MoecError from reading the checkpoint is re-raised as itself."""
    try:
        yield
    except MoecError:
        raise
    except Exception as e:
        cause = next((c for c in error_chain(e) if isinstance(c, MoecError)), None)
        if cause is None:
            raise
        raise cause from None


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


def compile(model_dir: str | Path, out: str | Path, *, plan: str | Path | None = None, force: bool = False,
            target: str = "cpu", data: str | Path | None = None, samples: int = 64, seq_len: int = 256,
            progress: bool = True) -> dict:
    """Compile a Hugging Face MoE checkpoint folder into an ONNX artifact folder; returns moec.json.

    The model is traced as a skeleton on the meta device; its weights are read from safetensors,
    quantized and written one decoder layer at a time, so a compile needs about one layer of
    memory (in fp32) plus the artifact. With `plan` (a moec-plan/1 file) weights are quantized to
    the plan's widths and the artifact is verified against a PyTorch model carrying the same
    dequantized weights. A GPTQ or weighted-grid plan quantizes the experts with `data` (default:
    the built-in corpus), `samples` windows of `seq_len` tokens.
    """
    import copy

    import onnx
    import onnx_ir as ir

    from moec.artifact import EXTERNAL_DATA_FILE, artifact_files, in_layer_order, metadata_props, past_shapes
    from moec.experts import checkpoint_experts_layers
    from moec.genai import GENAI_CONFIG_FILE, GENAI_MODEL_TYPE, genai_config
    from moec.gptq import calibrated_experts, needs_calibration
    from moec.planner import load_plan
    from moec.policy import (check_plan_fits, check_routing_fits, layer_routing, product_weights,
                             quantization_specs)
    from moec.record import build_record
    from moec.reference import streamed_reference
    from moec.targets import get_target
    from moec.trace_cache import traced
    from moec.verify import DECODE_STEPS, verification_input, verify
    from moec.weights import ResidentPart, StreamingModel

    checkpoint = open_checkpoint(model_dir)
    target = get_target(target)
    plan_data = load_plan(plan) if plan is not None else None
    out = Path(out)
    stage_names = ["quantize", "trace", "lower", "save", "check", "reference", "verify"]
    with staging_folder(out, force) as staging, _Stages(stage_names, progress) as stages, \
            _checkpoint_errors_surfaced(), ExitStack() as cleanup:
        with stages.stage("quantize"):  # the experts whose quantizer reads calibration tokens
            prequantized, expert_tokens = calibrated_experts(checkpoint, plan_data, data, samples, seq_len, progress) \
                if needs_calibration(plan_data) else ({}, {})
        with stages.stage("trace"):
            stream = StreamingModel(checkpoint)
            layers = checkpoint_experts_layers(stream)
            # the traced experts keep the checkpoint's dtype too
            stream.keep_stored(stream.model.get_submodule(layer.path) for layer in layers)
            skeleton = copy.deepcopy(stream.model)  # traced; the stream keeps running the family's own experts
            routing = layer_routing(plan_data)
            if plan_data is not None:
                check_plan_fits(plan_data, layers, skeleton.config.num_hidden_layers)
            graph, reader = traced(checkpoint, skeleton, layers, ResidentPart(stream))
            cleanup.callback(reader.release)  # also when a later stage fails
            if plan_data is not None:
                check_routing_fits(routing, layers)
        with stages.stage("lower"):
            embedding_group = plan_data["quantization"]["group_size"] \
                if plan_data is not None and target.quantized_embeddings else None
            specs = quantization_specs(plan_data, product_weights(graph, embedding_group),
                                       [layer.block_path for layer in layers],
                                       target, prequantized)
            graph = ir.passes.PassManager(target.passes(specs, routing))(graph).model
        record = build_record(checkpoint, layers, graph, target, skeleton, plan_data, routing, specs, expert_tokens)
        genai, genai_unsupported = genai_config(checkpoint.config, past_shapes(graph), target.session_options,
                                                record["kv_in_place"])
        record["onnxruntime_genai"] = {"config": GENAI_CONFIG_FILE, "model_type": GENAI_MODEL_TYPE} \
            if genai is not None else {"unsupported": genai_unsupported}
        with stages.stage("save"):
            graph.metadata_props.clear()
            graph.metadata_props.update(metadata_props(record))
            in_layer_order(graph.graph, [layer.path for layer in layers])
            ir.save(graph, staging / MODEL_FILE, external_data=EXTERNAL_DATA_FILE)
            reader.release()
            shutil.copy2(checkpoint.path / "config.json", staging / "config.json")
            for f in checkpoint.tokenizer_files():
                shutil.copy2(f, staging / f.name)
            if genai is not None:
                (staging / GENAI_CONFIG_FILE).write_text(json.dumps(genai, indent=2))
        with stages.stage("check"):
            onnx.checker.check_model(str(staging / MODEL_FILE), full_check=True)
        record |= artifact_files(staging)
        (staging / RECORD_FILE).write_text(json.dumps(record, indent=2))  # what verification opens the artifact by
        with stages.stage("reference"):
            reference = streamed_reference(stream, layers, verification_input(skeleton.config.vocab_size),
                                           DECODE_STEPS, list(past_shapes(graph)), specs, routing)
        with stages.stage("verify"):
            record["verification"] = verify(staging, target, reference, quantized=bool(specs), pruned=bool(routing))
        record["seconds"] = stages.seconds
        (staging / RECORD_FILE).write_text(json.dumps(record, indent=2))
    return record
