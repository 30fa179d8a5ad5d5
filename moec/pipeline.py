"""compile(): checkpoint → traced graph (transformers' code, experts as one node) → passes → target lowering → artifact.

The artifact is built in a staging folder beside the output and swapped into place only after
it passed onnx.checker and the numeric check, so a failed or interrupted compile never leaves a
half-written artifact (nor removes the previous one); see moec.files.staging_folder.
"""

from __future__ import annotations

import functools
import json
import shutil
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np

import moec
from moec.checkpoint import open_checkpoint
from moec.errors import MoecError, error_chain
from moec.files import staging_folder
from moec.runtime import MODEL_FILE, RECORD_FILE

EXTERNAL_DATA_FILE = MODEL_FILE + ".data"


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


def verification_input(vocab_size: int, tokens: int = 8) -> np.ndarray:
    return np.random.default_rng(0).integers(0, vocab_size, (1, tokens), dtype=np.int64)


def compile(model_dir: str | Path, out: str | Path, *, plan: str | Path | None = None, force: bool = False,
            target: str = "cpu", data: str | Path | None = None, samples: int = 64, seq_len: int = 256,
            progress: bool = True) -> dict:
    """Compile a Hugging Face MoE checkpoint folder into an ONNX artifact folder; returns moec.json.

    The model is traced as a skeleton on the meta device; its weights are read from safetensors,
    quantized and written one decoder layer at a time, so a compile needs about one layer of
    memory (in fp32) plus the artifact. With `plan` (a moec-plan/1 file) weights are quantized to
    the plan's widths and the artifact is verified against a PyTorch model carrying the same
    dequantized weights. A GPTQ plan calibrates the experts on `data` (default: the built-in
    corpus), `samples` windows of `seq_len` tokens.
    """
    import copy

    import onnx
    import onnx_ir as ir

    from moec.experts import checkpoint_experts_layers
    from moec.genai import GENAI_CONFIG_FILE, GENAI_MODEL_TYPE, genai_config
    from moec.planner import load_plan
    from moec.policy import layer_pruning
    from moec.reference import streamed_reference
    from moec.targets import get_target
    from moec.weights import ResidentPart, StreamingModel

    checkpoint = open_checkpoint(model_dir)
    target_module = get_target(target)
    plan_data = load_plan(plan) if plan is not None else None
    out = Path(out)
    stage_names = ["gptq", "trace", "lower", "save", "check", "reference", "verify"]
    with staging_folder(out, force) as staging, _Stages(stage_names, progress) as stages, \
            _checkpoint_errors_surfaced(), ExitStack() as cleanup:
        with stages.stage("gptq"):
            prequantized, expert_tokens = ({}, {}) if plan_data is None or \
                plan_data["quantization"]["method"] != "gptq" else \
                gptq_experts(checkpoint, plan_data, data, samples, seq_len, progress)
        with stages.stage("trace"):
            stream = StreamingModel(checkpoint)
            layers = checkpoint_experts_layers(stream)
            # the traced experts keep the checkpoint's dtype too
            stream.keep_stored(stream.model.get_submodule(layer.path) for layer in layers)
            skeleton = copy.deepcopy(stream.model)  # traced; the stream keeps running the family's own experts
            pruning = layer_pruning(plan_data)
            if plan_data is not None:
                check_plan_fits(plan_data, layers, skeleton.config.num_hidden_layers)
            graph, reader = traced(checkpoint, skeleton, layers, ResidentPart(stream))
            cleanup.callback(reader.release)  # also when a later stage fails
            if plan_data is not None:
                check_pruning_fits(pruning, layers)
        with stages.stage("lower"):
            quantizers: dict = {}
            choose = None if plan_data is None else plan_quantizer(plan_data, quantizers, prequantized,
                                                                   [layer.block_path for layer in layers])
            for p in target_module.passes(choose, pruning):
                graph = p(graph).model
        with stages.stage("save"):
            in_layer_order(graph.graph, [layer.path for layer in layers])
            ir.save(graph, staging / MODEL_FILE, external_data=EXTERNAL_DATA_FILE)
            reader.release()
            shutil.copy2(checkpoint.path / "config.json", staging / "config.json")
            for f in checkpoint.tokenizer_files():
                shutil.copy2(f, staging / f.name)
            genai, genai_unsupported = genai_config(checkpoint.config, past_shapes(graph),
                                                    target_module.SESSION_OPTIONS)
            if genai is not None:
                (staging / GENAI_CONFIG_FILE).write_text(json.dumps(genai, indent=2))
        with stages.stage("check"):
            onnx.checker.check_model(str(staging / MODEL_FILE), full_check=True)
        record = build_record(checkpoint, layers, graph, target_module, skeleton, plan_data, pruning, quantizers,
                              expert_tokens)
        record["onnxruntime_genai"] = {"config": GENAI_CONFIG_FILE, "model_type": GENAI_MODEL_TYPE} \
            if genai is not None else {"unsupported": genai_unsupported}
        stamp_metadata(staging / MODEL_FILE, record)
        record |= artifact_files(staging)  # sizes after stamping
        probe = verification_input(skeleton.config.vocab_size)
        with stages.stage("reference"):
            reference = streamed_reference(stream, layers, probe, past_shapes(graph), quantizers, pruning)
        with stages.stage("verify"):
            record["verification"] = verify(staging, target_module, probe, reference,
                                            quantized=bool(quantizers), pruned=bool(pruning))
        record["seconds"] = stages.seconds
        (staging / RECORD_FILE).write_text(json.dumps(record, indent=2))
    return record


_TRACES: dict = {}  # checkpoint identity -> (traced graph, its CheckpointReader)
TRACES_KEPT = 4


def traced(checkpoint, skeleton, layers, resident):
    """The traced graph of the checkpoint (a copy of it: the passes change it in place) and the
    CheckpointReader its weights read through, reading from `resident` (the caller's stream). The
    trace (torch.onnx export: most of a small model's compile) is kept per process for the same
    checkpoint files, so compiling several plans of one model (a sweep, the benchmarks, the test
    suite) traces it once. Each layer's router k is read off its experts node (top_k_index [T, k])."""
    from moec import trace
    from moec.ops.moe import OP_TYPE

    # the files by name, size and time, not by folder: a copy (time kept) traces as its original
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in checkpoint.weight_files)
    key = (json.dumps(checkpoint.config, sort_keys=True), tuple(files))
    if key not in _TRACES:
        reader = CheckpointReader()
        reader.resident = resident
        tensors = [*skeleton.named_parameters(remove_duplicate=False), *skeleton.named_buffers(remove_duplicate=False)]
        _TRACES[key] = trace.trace(skeleton, {key: functools.partial(reader.read, key) for key, _ in tensors}), reader
        while len(_TRACES) > TRACES_KEPT:
            _TRACES.pop(next(iter(_TRACES)))
    graph, reader = _TRACES[key]
    reader.resident = resident
    top_k = {node.attributes["layer"].value: node.inputs[1].shape[1] for node in graph.graph if node.op_type == OP_TYPE}
    for layer in layers:
        layer.top_k = top_k[layer.layer]
    return _clone(graph), reader


def _clone(model):
    """A copy of a traced model that passes can change in place: onnx-ir's clone shares the values'
    type objects (whose dtype a pass may set in place, as Float16Pass does) and the tensors (which
    passes replace, never change)."""
    import copy

    import onnx_ir as ir

    clone = model.clone()
    graph = clone.graph
    values = [*graph.inputs, *graph.initializers.values(),
              *(v for node in ir.traversal.RecursiveGraphIterator(graph) for v in node.outputs)]
    for value in values:
        if value.type is not None:
            value.type = copy.deepcopy(value.type)
    return clone


class CheckpointReader:
    """Reads the traced model's weights (by state key) from the checkpoint through a ResidentPart
    (set by the compile that reads them), in the dtype the stream loads them in (fp32; routed
    experts in the checkpoint's dtype), as views, so slicing one expert of a stacked tensor copies
    only that expert."""

    resident = None  # the ResidentPart of the compile reading

    def read(self, key: str) -> np.ndarray:
        """A NumPy view (bf16 as ml_dtypes.bfloat16, through onnx-ir's own torch adapter)."""
        from onnx_ir.tensor_adapters import TorchTensor

        return TorchTensor(self.resident.tensor(key)).numpy()

    def release(self) -> None:
        if self.resident is not None:
            self.resident.release()


def in_layer_order(graph, experts_paths: list[str]) -> None:
    """Order the initializers by decoder layer, a layer's routed experts after the rest, so writing
    them materializes each experts module once."""
    import re

    from moec.ops.moe import EXPERT_WEIGHT_PATTERN

    def key(value) -> tuple[int, bool]:
        found = re.search(r"(?:^|\.)layers\.(\d+)\.", value.name)
        in_block = bool(re.match(EXPERT_WEIGHT_PATTERN, value.name)) or \
            any(value.name.startswith(path + ".") for path in experts_paths)
        return (int(found[1]) if found else -1, in_block)

    values = sorted(graph.initializers.values(), key=key)  # stable: keeps the order within a group
    graph.initializers.clear()
    for value in values:
        graph.register_initializer(value)


def past_shapes(graph) -> dict[str, tuple[int, ...]]:
    """Each past_key_values input's name and shape for batch 1 and a fresh sequence."""
    from moec.runtime import empty_shape

    return {v.name: empty_shape(v.shape, 1) for v in graph.graph.inputs if v.name.startswith("past_key_values.")}


def stamp_metadata(model_file: Path, record: dict) -> None:
    """Write what the build record says of the model into its metadata_props, for people and tools
    that open only model.onnx (netron, onnxruntime's ModelMetadata). Rewrites just the graph file."""
    import onnx
    import onnxruntime as ort

    quantization = record["quantization"] or {}
    props = {"moec.version": record["moec_version"], "moec.source_model": record["source_model"]["path"],
             "moec.model_type": record["source_model"]["model_type"], "moec.target": record["target"],
             "moec.avg_expert_bits": f"{quantization['avg_expert_bits']:.4f}" if quantization else "32 (float)",
             "moec.quantizer": quantization.get("method", "none"),
             "moec.pruning": json.dumps(record["pruning"]) if record["pruning"] else "none"}
    model = onnx.load(str(model_file), load_external_data=False)
    del model.metadata_props[:]
    # plain onnxruntime reads these session options when ORT_LOAD_CONFIG_FROM_MODEL=1
    tuned = record["session_options"]
    props["ort_config"] = json.dumps({"session_options": {
        "intra_op_num_threads": tuned["intra_op_num_threads"],
        "graph_optimization_level": int(getattr(ort.GraphOptimizationLevel, tuned["graph_optimization_level"]))}})
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(model_file))


def check_plan_fits(plan: dict, layers, num_layers: int) -> None:
    """The plan must have one row per layer: experts' widths for sparse layers, null for dense ones."""
    rows = plan["experts"]["bits"]
    if len(rows) != num_layers:
        raise MoecError(f"plan.json: experts.bits has {len(rows)} layers, the model has {num_layers}")
    sparse = {layer.layer: layer.num_experts for layer in layers}
    for layer, row in enumerate(rows):
        if layer in sparse and (row is None or len(row) != sparse[layer]):
            raise MoecError(f"plan.json: experts.bits[{layer}] must list {sparse[layer]} widths "
                            f"(layer {layer} is a MoE layer), got {row!r}")
        if layer not in sparse and row is not None:
            raise MoecError(f"plan.json: experts.bits[{layer}] must be null (layer {layer} has no experts)")


def check_pruning_fits(pruning: dict, layers) -> None:
    """Only sparse layers with more than one routed expert per token can prune."""
    top_k = {layer.layer: layer.top_k for layer in layers}
    for layer in pruning:
        if layer not in top_k:
            raise MoecError(f"plan.json: pruning.layers names layer {layer}, which has no routed experts")
        if top_k[layer] < 2:
            raise MoecError(f"plan.json: pruning.layers names layer {layer}, which routes each token to one "
                            "expert: there is nothing to prune")


def gptq_experts(checkpoint, plan: dict, data, samples: int, seq_len: int, progress: bool):
    """GPTQ'd routed experts (and each one's calibration token count) for a GPTQ plan."""
    from moec.gptq import quantize_experts
    from moec.runtime import Tokenizer
    from moec.text import read_text, token_windows

    text, _ = read_text(data)
    windows = token_windows(Tokenizer(checkpoint.path).encode(text), samples, seq_len)
    return quantize_experts(checkpoint, plan, windows, progress=progress)


def plan_quantizer(plan: dict, chosen: dict, prequantized: dict, moe_blocks: list[str]):
    """The MatMulNBits pass's callback: each weight's Quantizer from the plan's width, GPTQ's
    result where `prequantized` has the weight, else RTN; each one is recorded in `chosen`.
    `moe_blocks` are the module paths of the MoE blocks (their routers stay in float)."""
    from moec.policy import weight_bits
    from moec.quant import Quantizer

    group_size = plan["quantization"]["group_size"]

    def choose(name: str) -> Quantizer | None:
        bits = weight_bits(plan, name, moe_blocks)
        if bits is None:
            return None
        result = prequantized.get(name)
        chosen[name] = Quantizer(bits, group_size, "rtn" if result is None else result.method, result)
        return chosen[name]

    return choose


def verify(folder: Path, target, probe: np.ndarray, reference: list[np.ndarray], quantized: bool,
           pruned: bool = False) -> dict:
    """Run the artifact on `probe`; compare logits (and each layer's KV cache) with the reference.

    The check that fails the build runs every MatMulNBits in exact arithmetic (accuracy_level 0),
    so any packing, graph or kernel error shows up against the target's tolerance (absolute, plus a
    fraction of the reference's logit range for float16 targets) and is located by the first layer
    whose KV cache differs. The artifact as shipped (int8 activations per block on CPU) is
    measured too and recorded, not enforced: its rounding can flip a near-tied routing decision,
    which moves logits by more than any fixed tolerance without anything being wrong.
    """
    from moec.runtime import available_providers

    providers = available_providers(list(target.PROVIDERS))
    if quantized:
        with _exact_kernels(folder / MODEL_FILE) as exact:
            outputs = _run(exact, providers, probe)
    else:
        outputs = _run(folder / MODEL_FILE, providers, probe)
    diff = float(np.abs(outputs[0] - reference[0]).max())
    tolerance = target.VERIFY_TOLERANCE + target.VERIFY_RELATIVE_TOLERANCE * float(np.ptp(reference[0]))
    if not diff <= tolerance:
        layer = next((i // 2 for i, (got, want) in enumerate(zip(outputs[1:], reference[1:]))
                      if not np.abs(got - want).max() <= tolerance), None)
        if layer is None:
            where = "; every KV cache matches, so the error is in the last layer's MLP/MoE or the head"
        elif layer == 0:
            where = "; the KV cache of layer 0 differs: the error is in layer 0's attention projections"
        else:
            where = (f"; the KV cache first differs at layer {layer}: the error is in layer {layer - 1}'s "
                     f"MLP/MoE or layer {layer}'s attention projections")
        raise MoecError(f"verification failed: artifact logits differ from the reference by {diff:.3g} "
                        f"(tolerance {tolerance:.3g}){where}")
    against = "PyTorch with the same dequantized weights" if quantized else \
        "PyTorch with the MoE op's NumPy reference in the pruned layers" if pruned else \
        "transformers fp32, routed experts by the Experts op's NumPy reference"
    result = {"max_abs_logit_diff": diff, "tolerance": tolerance, "tokens": int(probe.size),
              "against": against + (", pruning as planned" if pruned and quantized else "")}
    if quantized:
        shipped = float(np.abs(_run(folder / MODEL_FILE, providers, probe)[0] - reference[0]).max())
        result["shipped_kernels"] = {"max_abs_logit_diff": shipped,
                                     "relative_to_logit_range": shipped / float(np.ptp(reference[0]))}
    return result


@contextmanager
def _exact_kernels(model_file: Path):
    """A copy of the model file (beside it, sharing its external data) with every MatMulNBits set
    to accuracy_level 0 (fp32 activations)."""
    import onnx

    def nodes(graph):  # and those of subgraphs (If branches)
        for node in graph.node:
            yield node
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    yield from nodes(attr.g)

    model = onnx.load(str(model_file), load_external_data=False)
    for node in nodes(model.graph):
        for attr in node.attribute:
            if node.op_type == "MatMulNBits" and attr.name == "accuracy_level":
                attr.i = 0
    exact = model_file.with_name(f".exact-{model_file.name}")
    onnx.save(model, str(exact))
    try:
        yield exact
    finally:
        exact.unlink()


def _run(model_file: Path, providers: list[str], probe: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    from moec.runtime import empty_past

    session = ort.InferenceSession(str(model_file), providers=providers)
    feeds = {"input_ids": probe, "attention_mask": np.ones_like(probe), "position_ids": np.arange(probe.shape[1])[None]}
    outputs = session.run(None, feeds | empty_past(session, 1))
    return [o.astype(np.float32) if o.dtype == np.float16 else o for o in outputs]


def build_record(checkpoint, layers, graph, target, model, plan: dict | None, pruning: dict,
                 quantized: dict, expert_tokens: dict) -> dict:
    """moec.json: what was built from what (the artifact's file sizes are added once it is final)."""
    config = model.config
    return {
        "format": "moec-artifact/1",
        "moec_version": moec.__version__,
        "source_model": {"path": str(checkpoint.path.resolve()), "model_type": checkpoint.model_type,
                         "weight_bytes": checkpoint.weight_bytes,
                         # the published quantized format dequantized on read, or float
                         "format": checkpoint.quant_method or "float"},
        "target": target.NAME,
        "providers": list(target.PROVIDERS),
        "session_options": target.SESSION_OPTIONS,
        "opset": graph.opset_imports.get("", None),
        "num_layers": config.num_hidden_layers,
        "moe_layers": [
            {"layer": layer.layer, "num_experts": layer.num_experts, "top_k": layer.top_k,
             "experts_module": layer.path, "experts": layer.spec.attributes(), "shared_expert": layer.shared_expert}
            for layer in layers
        ],
        "parameters": {"experts": sum(layer.num_experts * layer.expert_parameters() for layer in layers),
                       "total": sum(int(t.numel()) for t in model.parameters()) +
                       sum(int(t.numel()) for layer in layers for t in model.get_submodule(layer.block_path).buffers())},
        "quantization": None if plan is None else quantization_record(plan, layers, graph, quantized, expert_tokens,
                                                                      target.CONTAINER_BITS),
        "pruning": pruning_record(pruning),
    }


def artifact_files(folder: Path) -> dict:
    """The record's `bytes` (graph file, external data, total) and `files` of an artifact folder."""
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    return {"bytes": {"model.onnx": files.get(MODEL_FILE, 0), "external_data": files.get(EXTERNAL_DATA_FILE, 0),
                      "total": files.get(MODEL_FILE, 0) + files.get(EXTERNAL_DATA_FILE, 0)},
            "files": sorted(files)}


def quantization_record(plan: dict, layers, graph, quantized: dict, expert_tokens: dict,
                        container_bits: dict[int, int]) -> dict:
    """Per expert: width, the container MatMulNBits stores it in, bytes (of its initializers in
    `graph`), quantizer and calibration tokens; totals, averages, and the experts GPTQ had too
    few tokens for."""
    import re

    from moec.ops.moe import EXPERT_WEIGHT_PATTERN, expert_weight_name

    experts, expert_bytes, weighted_bits = [], 0, 0.0
    for layer in layers:
        row = []
        projections = layer.spec.projections
        for e in range(layer.num_experts):
            parts = [quantized.get(expert_weight_name(layer.layer, e, p)) for p in projections]
            if all(q is None for q in parts):
                row.append({"bits": 16, "stored_bits": 32, "bytes": 4 * layer.expert_parameters(), "quantizer": None})
            else:
                q = parts[0]
                nbytes = sum(_stored_bytes(graph, expert_weight_name(layer.layer, e, p)) for p in projections)
                row.append({"bits": q.bits, "stored_bits": container_bits[q.bits], "bytes": nbytes,
                            "quantizer": q.method})
            if expert_tokens:
                row[-1]["calibration_tokens"] = expert_tokens.get(expert_weight_name(layer.layer, e, "up"), 0)
            expert_bytes += row[-1]["bytes"]
            weighted_bits += row[-1]["bits"] * layer.expert_parameters()
        experts.append({"layer": layer.layer, "experts": row})
    non_expert = {name: {"bits": q.bits, "stored_bits": container_bits[q.bits], "bytes": _stored_bytes(graph, name)}
                  for name, q in quantized.items() if not re.fullmatch(EXPERT_WEIGHT_PATTERN, name)}
    params = sum(layer.num_experts * layer.expert_parameters() for layer in layers)
    repacked = sorted({q.bits for q in quantized.values() if container_bits[q.bits] != q.bits})
    return {
        "method": plan["quantization"]["method"], "group_size": plan["quantization"]["group_size"],
        "kernel": "com.microsoft.MatMulNBits",
        "widths_in_larger_containers": {str(b): container_bits[b] for b in repacked},
        "expert_bytes": expert_bytes, "avg_expert_bits": weighted_bits / params,
        "rtn_fallback_experts": [[layer["layer"], e] for layer in experts for e, x in enumerate(layer["experts"])
                                 if plan["quantization"]["method"] == "gptq" and x["quantizer"] == "rtn"],
        "predicted_expert_bytes": (plan.get("objective") or {}).get("predicted_expert_bytes"),
        "experts": experts, "non_expert": non_expert,
    }


def pruning_record(pruning: dict) -> dict | None:
    """Which layers prune with which beta, the importance the artifact uses, and its switch."""
    from moec.ops.moe import PRUNE_SWITCH

    if not pruning:
        return None
    return {"layers": [{"layer": layer, "beta": beta} for layer, (beta, _) in sorted(pruning.items())],
            "protect_fraction": next(iter(pruning.values()))[1],
            "importance": "L1 norm of the token's hidden state at the MoE input (proxy for the paper's "
                          "attention received x L1 norm)",
            "switch": f"input {PRUNE_SWITCH} (bool, default true); fed false, the artifact runs plain top-k"}


def _stored_bytes(graph, name: str) -> int:
    """Bytes of the MatMulNBits initializers (packed codes, scales, zero points) of weight `name`."""
    return sum(graph.graph.initializers[f"{name}.{suffix}"].const_value.nbytes
               for suffix in ("q", "scales", "zero_points"))
