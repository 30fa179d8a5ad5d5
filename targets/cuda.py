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

from moec.targets import Target


def _passes(target: Target, specs, routing) -> list:
    """As the CPU target's, in float16: the norms fused first, then everything made float16, before
    the lowering and MatMulNBits, which take the activations' dtype from the graph."""
    import onnx_ir.passes.common as common

    from moec.passes.float16 import Float16Pass
    from moec.passes.fuse_rms_norm import FuseRMSNormPass
    from moec.passes.logits_to_keep import LogitsToKeepPass
    from moec.passes.lower_moe import LowerMoEPass
    from moec.passes.lower_routes import LowerRoutesPass
    from moec.passes.matmul_nbits import MatMulNBitsPass
    from moec.passes.mask_dropped_experts import MaskDroppedExpertsPass
    from moec.passes.routing_attributes import RoutingAttributesPass

    return [FuseRMSNormPass(), Float16Pass(), LogitsToKeepPass(), RoutingAttributesPass(routing),
            MaskDroppedExpertsPass(), LowerRoutesPass(), LowerMoEPass(), MatMulNBitsPass(specs, target.accuracy_level),
            common.RemoveUnusedNodesPass(), common.RemoveUnusedOpsetsPass(), common.ClearMetadataAndDocStringPass()]


TARGET = Target(
    name="cuda",
    providers=("CUDAExecutionProvider", "CPUExecutionProvider"),
    container_bits={1: 4, 2: 4, 3: 4, 4: 4, 5: 8, 6: 8, 7: 8, 8: 8},  # CUDA's MatMulNBits: 4 and 8 bits
    scale_bytes=2,  # float16 activations and scales
    accuracy_level=0,  # float16 activations as they are (the CUDA kernels ignore the level)
    # float16 carries 11 significant bits: allow 1e-3 plus 1% of the reference's logit range
    verify_tolerance=1e-3,
    verify_relative_tolerance=1e-2,
    session_options={"intra_op_num_threads": 0, "graph_optimization_level": "ORT_ENABLE_ALL",
                     "enable_cpu_mem_arena": True, "config_entries": {}},
    pass_list=_passes,
)
