"""CUDA target: onnxruntime's CUDA execution provider (onnxruntime-gpu, `pip install moec[cuda]`).

Activations and weights in float16 (Float16Pass, before the lowering); RMSNorm fused by
onnxscript's ORT fusions into (Skip)SimplifiedLayerNormalization, which accumulates in float32, so a
large hidden state cannot overflow float16 in its square; the routing and the sum over experts stay
in float32 (the MoE lowering does that for any float16 graph); quantized weights as MatMulNBits.
onnxruntime's CUDA MatMulNBits kernels take 4 and 8 bits, so a 2-bit (or 1- or 3-bit) expert is
stored in the 4-bit container: the same codes and zero points, the same dequantized weights, twice
the bytes; the build record lists it under `widths_in_larger_containers`.
Layers stay flat (no If subgraphs, whose condition the host would have to read each step).

Where there is no GPU the artifact runs on the CPU provider, which inserts float32 casts around the
float16 nodes it has no kernel for.
"""

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization
from onnxscript.rewriter.ort_fusions.skip_normalization import fuse_skip_rms_normalization

from moec.passes.float16 import Float16Pass
from moec.passes.lower_moe import LowerMoEPass
from moec.passes.matmul_nbits import MatMulNBitsPass
from moec.passes.prune_experts import PruneExpertsPass

NAME = "cuda"
PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
ACCURACY_LEVEL = 0  # float16 activations as they are (the CUDA kernels ignore the level)
CONTAINER_BITS = {1: 4, 2: 4, 3: 4, 4: 4, 5: 8, 6: 8, 7: 8, 8: 8}
# float16 carries 11 significant bits: allow 1e-3 plus 1% of the reference's logit range
VERIFY_TOLERANCE = 1e-3
VERIFY_RELATIVE_TOLERANCE = 1e-2
SESSION_OPTIONS = {"intra_op_num_threads": 0, "graph_optimization_level": "ORT_ENABLE_ALL",
                   "enable_cpu_mem_arena": True, "config_entries": {}}


class FuseRMSNormPass(ir.passes.InPlacePass):
    """RMSNorm with the residual Add before it → onnxruntime's com.microsoft.SkipSimplifiedLayerNormalization,
    through onnxscript's ORT fusion rules. A norm without an Add before it (the first layer's) gets a
    zero skip: the plain SimplifiedLayerNormalization that onnxscript emits lives in the ONNX domain,
    where onnx.checker knows no such op. SkipSimplifiedLayerNormalization takes 2-D or 3-D input, so
    a per-head norm ([batch, sequence, heads, head size]: Qwen3's q and k norms) runs on the rows
    flattened and is shaped back."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        fused = fuse_rms_normalization(model) + fuse_skip_rms_normalization(model)
        for node in [n for n in model.graph if n.op_type == "SimplifiedLayerNormalization" and n.domain == ""]:
            x, scale = node.inputs[:2]
            flat = x.shape is None or len(x.shape) not in (2, 3)
            before, after = [], []
            if flat:
                rows = ir.node("Constant", [], attributes={"value": ir.tensor(np.array([-1, scale.shape[-1]]))})
                shape = ir.node("Shape", [x])
                before = [rows, shape, ir.node("Reshape", [x, rows.outputs[0]])]
                x = before[-1].outputs[0]
            zero = ir.node("Constant", [], attributes={"value": ir.tensor(np.array(0, np.float32))})
            skip = ir.node("Mul", [x, zero.outputs[0]])
            epsilon = node.attributes["epsilon"].value if "epsilon" in node.attributes else 1e-5
            norm = ir.node("SkipSimplifiedLayerNormalization", [x, skip.outputs[0], scale], domain="com.microsoft",
                           attributes={"epsilon": epsilon}, name=node.name)
            if flat:
                after = [ir.node("Reshape", [norm.outputs[0], shape.outputs[0]])]
            ir.convenience.replace_nodes_and_values(model.graph, node, [node], [*before, zero, skip, norm, *after],
                                                    node.outputs[:1], (after or [norm])[-1].outputs[:1])
        return ir.passes.PassResult(model, modified=bool(fused))


def passes(quantizer=None, pruning=None) -> list[ir.passes.PassBase]:
    """As the CPU target's (see moec.targets.cpu.passes), in float16."""
    low_bit = [MatMulNBitsPass(quantizer, ACCURACY_LEVEL, CONTAINER_BITS)] if quantizer else []
    return [FuseRMSNormPass(), Float16Pass(), PruneExpertsPass(pruning or {}), LowerMoEPass(), *low_bit,
            common.RemoveUnusedNodesPass(), common.RemoveUnusedOpsetsPass(),
            common.ClearMetadataAndDocStringPass()]
