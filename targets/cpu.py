"""CPU target: onnxruntime's CPU execution provider.

Lowers the MoE nodes to routed per-expert MatMul graphs, turns quantized weights into
MatMulNBits with accuracy_level 4 (int8 activations per block: measured 10-17x faster than fp32
for decode-shaped products), and drops the exporter's per-node debug metadata (a third of the file).
"""

import onnx_ir as ir
import onnx_ir.passes.common as common

from moec.passes.lower_moe import LowerMoEPass
from moec.passes.matmul_nbits import MatMulNBitsPass
from moec.passes.prune_experts import PruneExpertsPass

NAME = "cpu"
PROVIDERS = ("CPUExecutionProvider",)
ACCURACY_LEVEL = 4
# a layer with more routed experts computes them in If subgraphs of this many, each skipped when no
# token is routed into it: onnxruntime's session creation grows about quadratically with one graph's
# nodes. Measured on 8 layers of 128 experts, top-8 (bench/many_experts.py): flat 46.7 s to create
# a session and 39.7 ms per token; subgraphs of 32: 6.0 s, 22.3 ms; 16: 3.7 s, 17.2 ms; 8: 3.8 s,
# 15.7 ms. Eight experts (Mixtral) stay flat: one If per layer cost 20% of its decode speed.
EXPERTS_PER_SUBGRAPH = 8


def passes(quantizer=None, pruning=None) -> list[ir.passes.PassBase]:
    """`quantizer(name)` gives each weight's moec.quant.Quantizer, or None to keep it in float;
    `pruning` maps each dynamically pruned layer to (beta, protect_fraction)."""
    low_bit = [MatMulNBitsPass(quantizer, ACCURACY_LEVEL)] if quantizer else []
    return [PruneExpertsPass(pruning or {}), LowerMoEPass(EXPERTS_PER_SUBGRAPH), *low_bit, common.RemoveUnusedNodesPass(),
            common.RemoveUnusedOpsetsPass(), common.ClearMetadataAndDocStringPass()]
