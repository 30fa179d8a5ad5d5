"""Replace float weight products by onnxruntime's low-bit `com.microsoft.MatMulNBits`.

Matches: MatMul(x, W) with W an initializer [K, N], and Gemm(x, W, transB=1) with W [N, K]
(alpha = beta = 1, optional bias C), for which `quantize(name, W as [N, K])` returns a
QuantizedWeight (None leaves the node as it is).
Produces: MatMulNBits(x, B, scales, zero_points) with the packed codes as initializers named
`<weight>.q`, `<weight>.scales`, `<weight>.zero_points`, plus an Add for a Gemm's bias.
Widths MatMulNBits lacks are stored in the next container it has (1 → 2, 3 → 4 bits): the codes
fit unchanged and dequantize to the same weights.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from moec.quant import QuantizedWeight, pack_matmul_nbits

CONTAINER_BITS = {1: 2, 2: 2, 3: 4, 4: 4, 5: 8, 6: 8, 7: 8, 8: 8}


def _weight_nk(node: ir.Node) -> np.ndarray | None:
    """The node's constant weight as [N, K], or None if the node does not qualify."""
    if node.op_type not in ("MatMul", "Gemm") or node.domain != "":
        return None
    weight = node.inputs[1]
    if weight is None or weight.const_value is None or len(weight.const_value.shape) != 2:
        return None
    if node.op_type == "Gemm":
        attrs = {k: a.value for k, a in node.attributes.items()}
        if attrs.get("transB", 0) != 1 or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 \
                or attrs.get("beta", 1.0) != 1.0:
            return None
        return weight.const_value.numpy()
    return weight.const_value.numpy().T


class MatMulNBitsPass(ir.passes.InPlacePass):
    def __init__(self, quantize: Callable[[str, np.ndarray], QuantizedWeight | None], accuracy_level: int = 4):
        super().__init__()
        self.quantize = quantize
        self.accuracy_level = accuracy_level

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph, modified = model.graph, False
        for node in list(graph):
            weight_nk = _weight_nk(node)
            if weight_nk is None:
                continue
            name = node.inputs[1].name
            quantized = self.quantize(name, weight_nk)
            if quantized is None:
                continue
            self._replace(graph, node, name, quantized)
            modified = True
        if modified:
            model.opset_imports.setdefault("com.microsoft", 1)
        return ir.passes.PassResult(model, modified)

    def _replace(self, graph: ir.Graph, node: ir.Node, name: str, q: QuantizedWeight) -> None:
        bits = CONTAINER_BITS[q.bits]
        packed, scales, zeros = pack_matmul_nbits(q.codes, q.scales, q.zeros, bits, q.group_size)
        tape = ir.tape.Tape(graph)
        inputs = [node.inputs[0]] + [tape.initializer(ir.tensor(a, name=f"{name}.{suffix}"), name=f"{name}.{suffix}")
                                     for a, suffix in ((packed, "q"), (scales, "scales"), (zeros, "zero_points"))]
        n, k = q.codes.shape
        out = tape.op("MatMulNBits", inputs, {"K": k, "N": n, "bits": bits, "block_size": q.group_size,
                                              "accuracy_level": self.accuracy_level},
                      domain="com.microsoft", name=f"{node.name or name}/MatMulNBits")
        if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
            out = tape.op("Add", [out, node.inputs[2]], name=f"{node.name or name}/bias")
        ir.convenience.replace_nodes_and_values(graph, node, [node], tape.nodes, node.outputs, [out])
