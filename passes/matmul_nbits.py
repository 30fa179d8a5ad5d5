"""Replace float weight products by onnxruntime's low-bit `com.microsoft.MatMulNBits`.

Matches: MatMul(x, W) with W an initializer [K, N], and Gemm(x, W, transB=1) with W [N, K]
(alpha = beta = 1, optional bias C), whose weight name has a quantization spec (moec.policy's
map from the plan; a weight without one stays as it is). Subgraphs (If branches) included.
Produces: MatMulNBits(x, B, scales, zero_points) with the packed codes as initializers named
`<weight>.q`, `<weight>.scales`, `<weight>.zero_points`, plus an Add for a Gemm's bias. The
codes are computed when the initializers are read (written out), one weight at a time, in the
spec's container (`stored_bits`: 1-bit codes in 2-bit MatMulNBits on CPU, the same dequantized
values). The scales take the replaced weight's dtype, which is the activations' (float16 on CUDA).
Requires: the experts lowered (no moec::Experts node), so each routed expert is its own product.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from moec.passes.lower_moe import is_moe_node
from moec.quant import ComputedTogether, Quantizer, pack_matmul_nbits


def product_weight(node: ir.Node) -> tuple[ir.TensorProtocol, bool] | None:
    """The node's constant weight and whether it is stored as [K, N] (MatMul) rather than [N, K]
    (Gemm with transB), or None if the node does not qualify."""
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
        return weight.const_value, False
    return weight.const_value, True


class PackedWeight:
    """A weight's three packed inputs (`q`, `scales`, `zero_points`: MatMulNBits' layout, which
    GatherBlockQuantized reads too), computed together when written (moec.quant.ComputedTogether)."""

    def __init__(self, weight: ir.TensorProtocol, k_by_n: bool, quantizer: Quantizer):
        self.weight, self.k_by_n, self.quantizer = weight, k_by_n, quantizer
        self.arrays = ComputedTogether(self._pack)

    def _pack(self) -> dict[str, np.ndarray]:
        q = self.quantizer.result  # computed ahead (GPTQ): the float weight need not be read
        if q is None:
            weight = self.weight.numpy()
            q = self.quantizer(weight.T if self.k_by_n else weight)
        codes, scales, zeros = pack_matmul_nbits(q.codes, q.scales, q.zeros, self.quantizer.stored_bits, q.group_size)
        return {"q": codes, "scales": scales.astype(self.weight.dtype.numpy(), copy=False), "zero_points": zeros}

    def initializers(self, root: ir.Graph, name: str, shapes: dict) -> list[ir.Value]:
        """`{name}.{q,scales,zero_points}` as lazy initializers of root, `shapes` giving each its
        (dtype, shape) (the packed arrays are reshaped to it); those of a weight that another product
        read first (a looped layer's, once per pass) as they are."""
        if all(f"{name}.{suffix}" in root.initializers for suffix in shapes):
            return [root.initializers[f"{name}.{suffix}"] for suffix in shapes]
        values = []
        for suffix, (dtype, shape) in shapes.items():
            def array(suffix=suffix, shape=shape):
                return ir.tensor(self.arrays.read(suffix).reshape(shape))

            tensor = ir.LazyTensor(array, dtype=dtype, shape=ir.Shape(shape))
            tensor.name = f"{name}.{suffix}"
            value = ir.Value(name=tensor.name, type=ir.TensorType(dtype), shape=tensor.shape, const_value=tensor)
            root.register_initializer(value)
            values.append(value)
        return values


class MatMulNBitsPass(ir.passes.InPlacePass):
    """`specs` maps a weight's name to how it is quantized and stored (moec.quant.Quantizer)."""

    def __init__(self, specs: Mapping[str, Quantizer], accuracy_level: int = 4):
        super().__init__()
        self.specs = specs
        self.accuracy_level = accuracy_level

    def requires(self, model: ir.Model) -> None:
        if any(is_moe_node(node) for node in model.graph):
            raise ir.passes.PreconditionError("MatMulNBitsPass runs after the experts lowering (LowerMoEPass)")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):  # subgraphs too (see lower_moe)
            weight = product_weight(node)
            if weight is None:
                continue
            name = node.inputs[1].name
            spec = self.specs.get(name)
            if spec is None:
                continue
            self._replace(model.graph, node, name, PackedWeight(*weight, spec))
            modified = True
        if modified:
            model.opset_imports.setdefault("com.microsoft", 1)
        return ir.passes.PassResult(model, modified)

    def _replace(self, root: ir.Graph, node: ir.Node, name: str, packed: PackedWeight) -> None:
        """Put MatMulNBits in the node's place (in whichever graph holds it), its initializers in `root`."""
        q = packed.quantizer
        bits = q.stored_bits
        k, n = packed.weight.shape if packed.k_by_n else packed.weight.shape[::-1]
        blocks = -(-k // q.group_size)
        shapes = {"q": (ir.DataType.UINT8, [n, blocks, q.group_size * bits // 8]),
                  "scales": (packed.weight.dtype, [n, blocks]),
                  "zero_points": (ir.DataType.UINT8, [n, -(-blocks * bits // 8)])}
        tape = ir.tape.Tape()
        inputs = [node.inputs[0], *packed.initializers(root, name, shapes)]
        out = tape.op("MatMulNBits", inputs, {"K": k, "N": n, "bits": bits, "block_size": q.group_size,
                                              "accuracy_level": self.accuracy_level},
                      domain="com.microsoft", name=f"{node.name or name} ({q.bits}-bit)")
        if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
            out = tape.op("Add", [out, node.inputs[2]], name=f"{node.name or name}/bias")
        ir.convenience.replace_nodes_and_values(node.graph, node, [node], tape.nodes, node.outputs, [out])
