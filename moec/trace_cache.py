"""The traced graph of a checkpoint, kept per process, and the reader its weights are read through.

The trace (torch.onnx export: most of a small model's compile) is kept for the same checkpoint files,
so compiling several plans of one model (a sweep, the benchmarks, the test suite) traces it once.
Its weights are lazy: each is read from the checkpoint, through the compile's own stream, when the
artifact's bytes are written.
"""

from __future__ import annotations

import functools
import json

import numpy as np

_TRACES: dict = {}  # checkpoint identity -> (traced graph, its CheckpointReader)
TRACES_KEPT = 4


def traced(checkpoint, skeleton, layers, resident):
    """The traced graph of the checkpoint (a copy of it: the passes change it in place) and the
    CheckpointReader its weights read through, reading from `resident` (the caller's stream). Each
    layer's router k is read off its experts node (top_k_index [T, k]), or off its Routes node where
    its experts module routes for itself (and may call the experts once per route)."""
    from moec import trace
    from moec.ops import moe, routes

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
    top_k = {node.attributes["layer"].value: node.inputs[1].shape[1] for op_type in (moe.OP_TYPE, routes.OP_TYPE)
             for node in graph.graph if node.op_type == op_type}
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
