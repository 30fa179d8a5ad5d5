"""CPU target: onnxruntime's CPU execution provider.

Gives the graph a logits_to_keep input, lowers attention with a KV cache onto
com.microsoft.GroupQueryAttention (which appends to a shared past/present buffer in place), the
Experts nodes to routed graphs (each layer's routed tokens Split by expert, each expert just its
own MatMuls and activation; in layers of many experts, the quantized ones as one
com.microsoft.QMoE node per width), turns the other
quantized weights into MatMulNBits with accuracy_level 4 (int8 activations per block: measured
10-17x faster than fp32 for decode-shaped products) and the embedding table into
GatherBlockQuantized, and drops the exporter's per-node debug metadata (a third of the file).
"""

from moec.targets import Target

# a layer with more routed experts computes them in If subgraphs of this many, each skipped when no
# token is routed into it: onnxruntime's session creation grows about quadratically with one graph's
# nodes. Measured on 8 layers of 128 experts, top-8 (bench/many_experts.py): flat 46.7 s to create
# a session and 39.7 ms per token; subgraphs of 32: 6.0 s, 22.3 ms; 16: 3.7 s, 17.2 ms; 8: 3.8 s,
# 15.7 ms. Eight experts (Mixtral) stay flat: one If per layer cost 20% of its decode speed. With
# the current lowering (5 nodes an expert, 15 then), 8 layers of 64 experts, top-8: 2.5 s with
# subgraphs of 8 against 7.3 s flat, and decode within noise of each other.
EXPERTS_PER_SUBGRAPH = 8
# the widths whose experts onnxruntime's com.microsoft.QMoE computes, one node per width and layer
# (verification runs each exactly: moec.verify)
QMOE_WIDTHS = frozenset((2, 4, 8))
# ... in layers of at least this many experts. Measured (bench/compare.py's models, 2.5-bit plans, 2
# threads, an AVX-512 host, alternating runs): 64 experts top-8, QMoE decodes at 130-137 tok/s
# against 82-95 per expert and prefills at 548-580 against 691-760; 8 experts top-2, it decodes at
# 101-126 against 79-130 (noise) and prefills at half the speed (339-348 against 537-692):
# onnxruntime's 2-bit QMoE kernel is slow on many tokens, and a layer of few experts pays little
# per expert.
QMOE_MIN_EXPERTS = 16


def _passes(target: Target, specs, routing) -> list:
    import onnx_ir.passes.common as common

    from moec.passes.gather_block_quantized import GatherBlockQuantizedPass
    from moec.passes.group_query_attention import GroupQueryAttentionPass
    from moec.passes.logits_to_keep import LogitsToKeepPass
    from moec.passes.lower_moe import FusedExperts, LowerMoEPass
    from moec.passes.lower_routes import LowerRoutesPass
    from moec.passes.matmul_nbits import MatMulNBitsPass
    from moec.passes.mask_dropped_experts import MaskDroppedExpertsPass
    from moec.passes.merge_sibling_products import MergeSiblingProductsPass
    from moec.passes.routing_attributes import RoutingAttributesPass

    fused = FusedExperts(specs, QMOE_WIDTHS, target.accuracy_level, QMOE_MIN_EXPERTS)
    return [LogitsToKeepPass(), GroupQueryAttentionPass(), RoutingAttributesPass(routing), MaskDroppedExpertsPass(),
            LowerRoutesPass(), LowerMoEPass(EXPERTS_PER_SUBGRAPH, fused),
            MatMulNBitsPass(specs, target.accuracy_level), MergeSiblingProductsPass(), GatherBlockQuantizedPass(specs),
            common.RemoveUnusedNodesPass(), common.RemoveUnusedOpsetsPass(), common.ClearMetadataAndDocStringPass()]


TARGET = Target(
    name="cpu",
    providers=("CPUExecutionProvider",),
    container_bits={1: 2, 2: 2, 3: 4, 4: 4, 5: 8, 6: 8, 7: 8, 8: 8},  # MatMulNBits on CPU: 2, 4 and 8 bits
    scale_bytes=4,  # float32 activations and scales
    accuracy_level=4,
    verify_tolerance=1e-3,
    verify_relative_tolerance=0.0,
    # how onnxruntime should run the artifact; moec.json, the model's metadata (`ort_config`, read by
    # plain onnxruntime under ORT_LOAD_CONFIG_FROM_MODEL=1) and genai_config.json carry it. Measured on
    # the 8-layer Mixtral-proportioned 2.5-bit artifact (2 cores): a thread per physical core (0)
    # decodes in 7.7 ms/token against 9.0 with one thread and 9.1 with spinning threads off; without
    # the memory arena it is no faster. These are onnxruntime's defaults, written down so that every
    # runner has them.
    session_options={"intra_op_num_threads": 0, "graph_optimization_level": "ORT_ENABLE_ALL",
                     "enable_cpu_mem_arena": True, "config_entries": {"session.intra_op.allow_spinning": "1"}},
    pass_list=_passes,
    quantized_embeddings=True,
)
