"""Verification: the artifact run on a probe against the PyTorch reference, in exact arithmetic."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np

from moec.errors import MoecError
from moec.runtime import MODEL_FILE


def verification_input(vocab_size: int, tokens: int = 8) -> np.ndarray:
    return np.random.default_rng(0).integers(0, vocab_size, (1, tokens), dtype=np.int64)


def verify(folder: Path, target, probe: np.ndarray, reference: list[np.ndarray], quantized: bool,
           pruned: bool = False) -> dict:
    """Run the artifact on `probe`; compare logits (and each layer's KV cache) with the reference.

    The check that fails the build runs every MatMulNBits and QMoE in exact arithmetic
    (accuracy_level 0; a 2-bit QMoE's codes in a 4-bit one), so any packing, graph or kernel
    error shows up against the target's tolerance (absolute, plus a
    fraction of the reference's logit range for float16 targets) and is located by the first layer
    whose KV cache differs. The artifact as shipped (int8 activations per block on CPU) is
    measured too and recorded, not enforced: its rounding can flip a near-tied routing decision,
    which moves logits by more than any fixed tolerance without anything being wrong.
    """
    from moec.runtime import available_providers

    providers = available_providers(list(target.providers))
    if quantized:
        with _exact_kernels(folder / MODEL_FILE) as exact:
            outputs = _run(exact, providers, probe)
    else:
        outputs = _run(folder / MODEL_FILE, providers, probe)
    diff = float(np.abs(outputs[0] - reference[0]).max())
    tolerance = target.verify_tolerance + target.verify_relative_tolerance * float(np.ptp(reference[0]))
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
    """A copy of the model file (beside it, sharing its external data) with every MatMulNBits and QMoE
    set to accuracy_level 0 (fp32 activations). onnxruntime's 2- and 8-bit QMoE have no exact mode
    at that level (the 2-bit LUT kernel and the 8-bit MatMulNBits kernel round activations to int8
    whatever it says), so the copy runs a 2-bit QMoE's codes, scales and zero points in a 4-bit
    QMoE, which is exact, repacked into a file of its own beside it, and makes an 8-bit QMoE's
    scales graph inputs: with scales that are not constant, QMoE dequantizes its experts to float32
    and multiplies with SGEMM (measured: 3e-7 of the output's range, against 1e-2 otherwise)."""
    import onnx

    def nodes(graph):  # and those of subgraphs (If branches)
        for node in graph.node:
            yield node
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    yield from nodes(attr.g)

    model = onnx.load(str(model_file), load_external_data=False)
    exact = model_file.with_name(f".exact-{model_file.name}")
    repacked = model_file.with_name(f".exact-{model_file.name}.data")
    try:
        with open(repacked, "wb") as data:
            for node in nodes(model.graph):
                for attr in node.attribute:
                    if node.op_type in ("MatMulNBits", "QMoE") and attr.name == "accuracy_level":
                        attr.i = 0
                if node.op_type == "QMoE" and _attribute(node, "expert_weight_bits") == 2:
                    _widen_qmoe(model, node, model_file.parent, data, repacked.name)
                if node.op_type == "QMoE" and _attribute(node, "expert_weight_bits") == 8:
                    _overridable_scales(model, node)
        onnx.save(model, str(exact))
        yield exact
    finally:
        exact.unlink(missing_ok=True)
        repacked.unlink(missing_ok=True)


def _attribute(node, name: str):
    import onnx

    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def _widen_qmoe(model, node, folder: Path, data, data_name: str) -> None:
    """Point a 2-bit QMoE node at 4-bit copies of its codes and zero points (written to `data`), in
    place of the 2-bit ones (read by no other node)."""
    import onnx
    from onnx.numpy_helper import from_array, to_array

    from moec.quant import repack_rows

    initializers = {t.name: t for t in model.graph.initializer}
    blocks = {11: 3, 12: 6}  # a zero point input's scales: its row's width is their blocks
    for index in (2, 5, 11, 12):  # fc1 and fc2 codes, then their zero points
        stored = initializers[node.input[index]]
        tensor = onnx.TensorProto()
        tensor.CopyFrom(stored)
        if onnx.external_data_helper.uses_external_data(tensor):  # small ones are stored inline
            onnx.external_data_helper.load_external_data_for_tensor(tensor, str(folder))
        array = to_array(tensor)
        width = initializers[node.input[blocks[index]]].dims[-1] if index in blocks else array.shape[-1] * 4
        wide = from_array(repack_rows(array, 2, 4, width), f"{stored.name}.as4bit")
        offset = data.tell()
        data.write(wide.raw_data)
        wide.ClearField("raw_data")
        wide.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(data.tell() - offset))):
            wide.external_data.add(key=key, value=value)
        model.graph.initializer.remove(stored)
        model.graph.initializer.append(wide)
        node.input[index] = wide.name
    for attr in node.attribute:
        if attr.name == "expert_weight_bits":
            attr.i = 4


def _overridable_scales(model, node) -> None:
    """List a QMoE node's fc1 and fc2 scales among the graph inputs (an initializer that is also an
    input is a default the caller may override, so onnxruntime does not prepack the experts)."""
    import onnx

    initializers = {t.name: t for t in model.graph.initializer}
    for index in (3, 6):
        scales = initializers[node.input[index]]
        model.graph.input.append(onnx.helper.make_tensor_value_info(scales.name, scales.data_type, scales.dims))


def _run(model_file: Path, providers: list[str], probe: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    from moec.runtime import empty_past

    options = ort.SessionOptions()
    options.log_severity_level = 3  # not the exact copy's warnings that it keeps scales overridable
    session = ort.InferenceSession(str(model_file), options, providers=providers)
    feeds = {"input_ids": probe, "attention_mask": np.ones_like(probe), "position_ids": np.arange(probe.shape[1])[None]}
    outputs = session.run(None, feeds | empty_past(session, 1))
    return [o.astype(np.float32) if o.dtype == np.float16 else o for o in outputs]
