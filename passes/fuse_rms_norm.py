"""Fuse RMSNorm into onnxruntime's com.microsoft.SkipSimplifiedLayerNormalization.

Matches: opset 23 RMSNormalization over the last axis (what moec.trace exports), and the RMSNorm
subgraphs (Pow, ReduceMean, Add epsilon, Sqrt/Reciprocal, Mul, Mul by the scale) that onnxscript's
ORT fusion rules recognize, with or without the residual Add before them.
Produces: SkipSimplifiedLayerNormalization (accumulating in float32, so a large hidden state cannot
overflow float16 in its square); a norm without an Add before it gets a zero skip, a per-head
norm ([batch, sequence, heads, head size]) runs on its rows flattened and is shaped back, and a
norm scaled per row (Ergo's per-expert norm: a Gather of one scale a route) is scaled after it.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization
from onnxscript.rewriter.ort_fusions.skip_normalization import fuse_skip_rms_normalization


class FuseRMSNormPass(ir.passes.InPlacePass):
    """RMSNorm → SkipSimplifiedLayerNormalization, through onnxscript's ORT fusion rules (the plain
    SimplifiedLayerNormalization they emit is in the ONNX domain, where onnx.checker knows no such op)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        for node in [n for n in model.graph if n.op_type == "RMSNormalization" and n.domain == ""]:
            if node.attributes.get_int("axis", -1) == -1:  # as the ORT rules write it, for their skip fusion to match
                node.op_type = "SimplifiedLayerNormalization"
                node.attributes["stash_type"] = ir.AttrInt64("stash_type", 1)
        fused = fuse_rms_normalization(model) + fuse_skip_rms_normalization(model)
        simplified = [n for n in model.graph if n.op_type == "SimplifiedLayerNormalization" and n.domain == ""]
        if simplified:  # the fusion rules import the domain only where they fused something themselves
            model.opset_imports.setdefault("com.microsoft", 1)
        for node in simplified:
            x, scale = node.inputs[:2]
            flat = x.shape is None or len(x.shape) not in (2, 3)
            before, after = [], []
            scale_after = None
            if scale.shape is None or len(scale.shape) != 1:  # one scale per row (Ergo's per-expert norm)
                width = next((v.shape[-1] for v in (x, scale) if v.shape is not None and isinstance(v.shape[-1], int)),
                             None)
                if width is None:
                    raise ValueError(f"{node.name}: RMSNorm scaled per row over an axis of unknown size")
                ones = ir.node("Constant", [], attributes={"value": ir.tensor(np.ones(width, scale.dtype.numpy()))})
                before, scale_after, scale = [ones], scale, ones.outputs[0]
            if flat:
                rows = ir.node("Constant", [], attributes={"value": ir.tensor(np.array([-1, scale.shape[-1]]))})
                shape = ir.node("Shape", [x])
                before += [rows, shape, ir.node("Reshape", [x, rows.outputs[0]])]
                x = before[-1].outputs[0]
            zero = ir.node("Constant", [], attributes={"value": ir.tensor(np.array(0, np.float32))})
            skip = ir.node("Mul", [x, zero.outputs[0]])
            epsilon = node.attributes.get_float("epsilon", 1e-5)
            norm = ir.node("SkipSimplifiedLayerNormalization", [x, skip.outputs[0], scale], domain="com.microsoft",
                           attributes={"epsilon": epsilon}, name=node.name)
            if flat:
                after = [ir.node("Reshape", [norm.outputs[0], shape.outputs[0]])]
            if scale_after is not None:
                after.append(ir.node("Mul", [(after or [norm])[-1].outputs[0], scale_after]))
            ir.convenience.replace_nodes_and_values(model.graph, node, [node], [*before, zero, skip, norm, *after],
                                                    node.outputs[:1], (after or [norm])[-1].outputs[:1])
        return ir.passes.PassResult(model, modified=bool(fused) or bool(simplified))
