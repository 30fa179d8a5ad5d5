"""Fold the exporter's weight transposes into lazily transposed initializers.

Matches: Transpose(W) with W an initializer (torch.onnx emits one for every nn.Linear that is
not a Gemm).
Produces: a new initializer holding W transposed, consumed in place of the Transpose's output,
whose value is computed only when read (`ir.LazyTensor`). It takes W's name when the Transpose
was W's only use (W is dropped), else an exporter-style `val_` name.
The generic constant folder would materialize every transposed weight at once, which is the
whole model's linear weights in memory; this pass keeps a compile at one weight at a time.
"""

from __future__ import annotations

import onnx_ir as ir

# the value meta key marking an initializer that holds a checkpoint tensor in its stored layout
# (set by the front end when it binds the weights); this pass's transposed copies do not carry it
STORED_AS_IS = "moec.stored_as_is"


def transposed(tensor: ir.TensorProtocol, perm: list[int] | None) -> ir.LazyTensor:
    """`tensor` transposed by `perm` (reversed axes when None), computed when read, as a view:
    MatMulNBits reads a transposed weight back in its original layout, the writer copies it once."""
    axes = list(perm) if perm is not None else list(range(len(tensor.shape)))[::-1]
    shape = ir.Shape([tensor.shape[a] for a in axes])
    return ir.LazyTensor(lambda: ir.tensor(tensor.numpy().transpose(axes)), dtype=tensor.dtype, shape=shape)


class TransposeWeightsPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph, modified = model.graph, False
        for node in list(graph):
            if node.op_type != "Transpose" or node.domain != "":
                continue
            source = node.inputs[0]
            if source is None or source.name not in graph.initializers or source.const_value is None:
                continue
            perm = node.attributes["perm"].value if "perm" in node.attributes else None
            sole_use = len(source.uses()) == 1 and source not in graph.outputs
            if sole_use:
                graph.initializers.pop(source.name)
            tensor = transposed(source.const_value, perm)
            # a weight shared with other consumers (tied embeddings) gets an exporter-style name,
            # which NameWeightsPass replaces by its consumer's module path
            folded = ir.Value(name=source.name if sole_use else f"val_{source.name}_transposed",
                              shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor)
            graph.register_initializer(folded)
            node.outputs[0].replace_all_uses_with(folded)
            graph.remove(node, safe=True)
            modified = True
        return ir.passes.PassResult(model, modified)
