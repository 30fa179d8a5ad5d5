"""Merge the MatMulNBits that read the same activations into one: an attention layer's q, k and v
projections, an expert's gate and up.

Matches: two or more com.microsoft.MatMulNBits in one graph (If branches included) with the same
activation input and the same K, bits, block_size and accuracy_level, each with constant codes,
scales and zero points and no other input.
Produces: one MatMulNBits over their weights concatenated along N (computed when written; its
initializers are named `{base}+{base}+....q|scales|zero_points` after the products', each
`base` a product's own, and `....split` gives each product's N) and a Split of its output back
into theirs. One product reads and quantizes the activations once and dispatches one kernel:
on the compare models' 2.5-bit artifacts, 2 threads, decode 113.4 -> 119.5 tok/s (Mixtral's shape)
and 130.2 -> 135.6 (OLMoE's), with the same logits.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx_ir as ir

from moec.ops.moe import MERGED_JOIN, MERGED_ROWS

SUFFIXES = ("q", "scales", "zero_points")


def _key(node: ir.Node):
    """What siblings must share, or None for a node this pass leaves alone."""
    if node.op_type != "MatMulNBits" or node.domain != "com.microsoft" or len(node.inputs) != 4 or \
            any(v is None or v.const_value is None for v in node.inputs[1:]):
        return None
    attrs = {name: attr.value for name, attr in node.attributes.items()}
    return (id(node.graph), id(node.inputs[0]), attrs["K"], attrs["bits"], attrs["block_size"],
            attrs.get("accuracy_level", 0), node.inputs[2].dtype)


def _concatenated(parts: list[ir.Value], name: str) -> ir.Value:
    first = parts[0].const_value
    shape = ir.Shape([sum(p.const_value.shape[0] for p in parts), *first.shape[1:]])
    tensor = ir.LazyTensor(lambda: ir.tensor(np.concatenate([p.const_value.numpy() for p in parts])),
                           dtype=first.dtype, shape=shape)
    tensor.name = name
    return ir.Value(name=name, type=ir.TensorType(first.dtype), shape=shape, const_value=tensor)


class MergeSiblingProductsPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        groups = defaultdict(list)
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            key = _key(node)
            if key is not None:
                groups[key].append(node)
        merged = 0
        for nodes in groups.values():
            if len(nodes) > 1:
                self._merge(model.graph, nodes)
                merged += 1
        return ir.passes.PassResult(model, modified=bool(merged))

    @staticmethod
    def _merge(root: ir.Graph, nodes: list[ir.Node]) -> None:
        graph = nodes[0].graph
        base = MERGED_JOIN.join(n.inputs[1].name.removesuffix(".q") for n in nodes)
        sizes = [n.attributes["N"].value for n in nodes]
        if f"{base}{MERGED_ROWS}" in root.initializers:  # the same products merged before (a looped layer's pass)
            weights = [root.initializers[f"{base}.{suffix}"] for suffix in SUFFIXES]
            split_sizes = root.initializers[f"{base}{MERGED_ROWS}"]
        else:
            weights = []
            for index, suffix in enumerate(SUFFIXES, start=1):
                value = _concatenated([n.inputs[index] for n in nodes], f"{base}.{suffix}")
                root.register_initializer(value)  # weights live in the main graph, as the experts lowering keeps them
                weights.append(value)
            split_sizes = ir.Value(name=f"{base}{MERGED_ROWS}",
                                   const_value=ir.tensor(np.array(sizes, np.int64), name=f"{base}{MERGED_ROWS}"))
            root.register_initializer(split_sizes)
        attrs = {name: attr.value for name, attr in nodes[0].attributes.items()} | {"N": sum(sizes)}
        names = [n.name or n.outputs[0].name for n in nodes]
        product = ir.node("MatMulNBits", [nodes[0].inputs[0], *weights], attributes=attrs, domain="com.microsoft",
                          name=MERGED_JOIN.join(names))
        product.outputs[0].name = f"{product.name}:out"
        product.outputs[0].dtype = weights[1].dtype  # the scales': the activations' dtype
        split = ir.node("Split", [product.outputs[0], split_sizes], attributes={"axis": -1}, num_outputs=len(nodes),
                        name=f"{product.name}/Split")
        old = [n.outputs[0] for n in nodes]
        for new, was in zip(split.outputs, old):
            new.dtype, new.shape = weights[1].dtype, was.shape
        old_names = [v.name for v in old]
        ir.convenience.replace_nodes_and_values(graph, nodes[0], nodes, [product, split], old, list(split.outputs))
        for new, name in zip(split.outputs, old_names):
            new.name = name
