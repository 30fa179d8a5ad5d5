"""CPU target: onnxruntime's CPU execution provider.

Today it lowers the MoE nodes to routed per-expert MatMul graphs and drops the exporter's per-node debug metadata (a third of the file); later passes
(quantized kernels, fusions) are added to `passes()`.
"""

import onnx_ir as ir
import onnx_ir.passes.common as common

from moec.passes.lower_moe import LowerMoEPass

NAME = "cpu"
PROVIDERS = ("CPUExecutionProvider",)


def passes() -> list[ir.passes.PassBase]:
    return [LowerMoEPass(), common.RemoveUnusedNodesPass(), common.RemoveUnusedOpsetsPass(),
            common.ClearMetadataAndDocStringPass()]
