"""Verification: the artifact run on a prefill and cached decode steps against the PyTorch reference,
in exact arithmetic."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np

from moec.errors import MoecError
from moec.runtime import MODEL_FILE


def verification_input(vocab_size: int, tokens: int = 8) -> np.ndarray:
    return np.random.default_rng(0).integers(0, vocab_size, (1, tokens), dtype=np.int64)


# single-token steps after the prefill, each feeding the presents back as the next past
DECODE_STEPS = 2


def verify(folder: Path, target, reference: list[dict[str, np.ndarray]], quantized: bool,
           pruned: bool = False) -> dict:
    """Run the artifact over the reference's steps (moec.reference.streamed_reference: a prefill, then
    single-token decode steps) feeding each step's presents back as the next past, the way runners
    do: as they come (each present one step longer) and, where the graph appends in place
    (`kv_in_place`), as buffers for the whole sequence, the way moec's runtime does. Every step's
    logits and presents are compared with the reference; MoecError at the first that differs, naming
    the step and the first layer whose present differs.

    The check that fails the build runs every MatMulNBits and QMoE in exact arithmetic
    (accuracy_level 0; a 2-bit QMoE's codes in a 4-bit one), so any packing, graph, cache or kernel
    error shows up against the target's tolerance (absolute, plus a fraction of the reference's range
    for float16 targets). The artifact as shipped (int8 activations per block on CPU) is measured
    too and recorded, not enforced: its rounding can flip a near-tied routing decision, which moves
    logits by more than any fixed tolerance without anything being wrong.
    """
    from moec.runtime import Artifact, available_providers

    providers = available_providers(list(target.providers))
    with _exact_kernels(folder / MODEL_FILE) if quantized else nullcontext(folder / MODEL_FILE) as model_file:
        artifact = Artifact(folder, providers, model_file=model_file.name, log_severity=3)
        pasts = {"as they come": 0} | ({"in place": sum(step["input_ids"].shape[1] for step in reference)}
                                       if artifact.in_place else {})
        steps = [{"step": _step_name(i), "tokens": int(s["input_ids"].shape[1])} for i, s in enumerate(reference)]
        for kind, capacity in pasts.items():
            for i, (got, want) in enumerate(zip(_run(artifact, reference, capacity, kind), reference)):
                tolerance = _tolerance(target, want["logits"])
                diff = float(np.abs(got["logits"] - want["logits"]).max())
                differing = next((name for name in want if name.startswith("present.")
                                  and not _max_diff(got[name], want[name]) <= _tolerance(target, want[name])), None)
                if not diff <= tolerance or differing is not None:
                    raise MoecError(f"verification failed at {_step_name(i)} (past fed back {kind}): artifact logits "
                                    f"differ from the reference by {diff:.3g} (tolerance {tolerance:.3g})"
                                    f"{_where(differing)}")
                steps[i]["max_abs_logit_diff"] = max(diff, steps[i].get("max_abs_logit_diff", 0.0))
    against = "PyTorch with the same dequantized weights" if quantized else \
        "PyTorch with the MoE op's NumPy reference in the pruned layers" if pruned else \
        "transformers fp32, routed experts by the Experts op's NumPy reference"
    result = {"max_abs_logit_diff": max(step["max_abs_logit_diff"] for step in steps),
              "tolerance": max(_tolerance(target, step["logits"]) for step in reference),
              "tokens": sum(step["tokens"] for step in steps), "steps": steps, "pasts": list(pasts),
              "against": against + (", pruning as planned" if pruned and quantized else "")}
    if quantized:
        shipped = _run(Artifact(folder, providers, log_severity=3), reference, 0, "as they come, kernels as shipped")
        diff = max(float(np.abs(got["logits"] - want["logits"]).max()) for got, want in zip(shipped, reference))
        result["shipped_kernels"] = {"max_abs_logit_diff": diff,
                                     "relative_to_logit_range": diff / float(np.ptp(reference[0]["logits"]))}
    return result


def _step_name(index: int) -> str:
    return "prefill" if index == 0 else f"decode step {index}"


def _tolerance(target, reference: np.ndarray) -> float:
    spread = float(np.ptp(reference)) if reference.size else 0.0  # a state with nothing in it yet
    return target.verify_tolerance + target.verify_relative_tolerance * spread


def _max_diff(got: np.ndarray, want: np.ndarray) -> float:
    """Keys and values are compared over the tokens both hold: transformers' own cache keeps a
    sliding-window layer's last window only, the artifact every token."""
    if got.shape != want.shape and got.ndim == 4 and got.shape[2] >= want.shape[2]:
        got = got[:, :, got.shape[2] - want.shape[2]:]
    if got.shape != want.shape:
        return float("inf")
    return float(np.abs(got - want).max()) if got.size else 0.0  # a state with nothing in it yet


def _where(present: str | None) -> str:
    """Where the error lies, from the first present (in layer order) that differs."""
    if present is None:
        return "; every present matches, so the error is in the last layer's MLP/MoE or the head"
    layer = int(present.split(".")[1])
    if layer == 0:
        return f"; {present} differs first: the error is in layer 0's attention or cache"
    return (f"; {present} differs first: the error is in layer {layer - 1}'s MLP/MoE or layer {layer}'s "
            "attention or cache")


def _run(artifact, reference: list[dict[str, np.ndarray]], capacity: int, kind: str):
    """The artifact's logits and presents (float32) at each of the reference's steps (batch 1), from an
    empty cache whose in-place pasts hold `capacity` tokens (0: each present is fed back as it comes);
    a step onnxruntime cannot run fails verification."""
    past, seen = artifact.empty_cache(1, capacity), 0
    for i, step in enumerate(reference):
        ids = step["input_ids"]
        seen += ids.shape[1]
        try:
            logits, past = artifact.forward(ids, np.ones((1, seen), np.int64),
                                            np.arange(seen - ids.shape[1], seen)[None], past)
        except Exception as e:  # onnxruntime's errors are RuntimeErrors of its own kinds
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise MoecError(f"verification failed at {_step_name(i)} (past fed back {kind}): onnxruntime cannot "
                            f"run the artifact ({first})") from None
        presents = {artifact.present_of[name]: value.numpy()[:, :, :seen] if name in artifact.in_place
                    else value.numpy() for name, value in past.items()}
        yield {name: value.astype(np.float32) for name, value in {"logits": logits, **presents}.items()}


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
