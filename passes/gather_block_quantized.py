"""Replace float embedding lookups by onnxruntime's block-quantized `com.microsoft.GatherBlockQuantized`.

Matches: Gather(W, indices) on axis 0 with W an initializer [V, H] whose name has a quantization
spec (moec.policy's map from the plan: the `embedding` width) and H a whole number of its blocks.
Subgraphs included.
Produces: GatherBlockQuantized(q, indices, scales, zero_points) (gather_axis 0, blocks along H),
its initializers named `<weight>.q` [V, H * bits / 8], `<weight>.scales` [V, blocks] and
`<weight>.zero_points`, packed as MatMulNBits packs a weight's rows (moec.quant.pack_matmul_nbits),
computed when written. A decoded token reads one row; the table's bytes on disk and in memory
shrink by the width (float32 → 8 bits: 4x).
"""

from __future__ import annotations

from collections.abc import Mapping

import onnx_ir as ir

from moec.passes.matmul_nbits import PackedWeight
from moec.quant import Quantizer


def embedding_weight(node: ir.Node) -> ir.TensorProtocol | None:
    """The constant table a Gather on axis 0 reads, or None if the node does not qualify."""
    if node.op_type != "Gather" or node.domain != "":
        return None
    table = node.inputs[0]
    axis = node.attributes.get("axis")
    if table is None or table.const_value is None or len(table.const_value.shape) != 2 or \
            (axis is not None and axis.value != 0):
        return None
    return table.const_value


class GatherBlockQuantizedPass(ir.passes.InPlacePass):
    """`specs` maps a weight's name to how it is quantized and stored (moec.quant.Quantizer)."""

    def __init__(self, specs: Mapping[str, Quantizer]):
        super().__init__()
        self.specs = specs

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
            table = embedding_weight(node)
            spec = None if table is None else self.specs.get(node.inputs[0].name)
            if spec is None:
                continue
            if table.shape[1] % spec.group_size:  # moec.policy.product_weights gives no spec to such a table
                raise ValueError(f"{node.inputs[0].name}: rows of {table.shape[1]} are no whole number of "
                                 f"blocks of {spec.group_size}")
            self._replace(model.graph, node, node.inputs[0].name, PackedWeight(table, False, spec))
            modified = True
        if modified:
            model.opset_imports.setdefault("com.microsoft", 1)
        return ir.passes.PassResult(model, modified)

    def _replace(self, root: ir.Graph, node: ir.Node, name: str, packed: PackedWeight) -> None:
        q = packed.quantizer
        bits = q.stored_bits
        rows, width = packed.weight.shape
        blocks = width // q.group_size
        shapes = {"q": (ir.DataType.UINT8, [rows, width * bits // 8]),
                  "scales": (packed.weight.dtype, [rows, blocks]),
                  "zero_points": (ir.DataType.UINT8, [rows, -(-blocks * bits // 8)])}
        inputs = packed.initializers(root, name, shapes)
        tape = ir.tape.Tape()
        out = tape.op("GatherBlockQuantized", [inputs[0], node.inputs[1], *inputs[1:]],
                      {"bits": bits, "block_size": q.group_size, "gather_axis": 0, "quantize_axis": 1},
                      domain="com.microsoft", name=f"{node.name or name} ({q.bits}-bit)")
        ir.convenience.replace_nodes_and_values(node.graph, node, [node], tape.nodes, node.outputs, [out])
