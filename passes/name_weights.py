"""Name weights after the torch module they came from.

Matches: MatMul / Gemm (weight = input 1) and Gather (weight = input 0) nodes whose weight is an
initializer and that carry torch.onnx's `pkg.torch.onnx.name_scopes` metadata.
Produces: the initializer named by its module path, e.g. `model.layers.0.self_attn.q_proj.weight`
(torch.onnx keeps parameter names, but folded weights come out as `val_134`, and a weight tied
across modules carries one module's name, e.g. the embedding as `lm_head.weight`): a name not
under the consuming module becomes `<module path>.weight`. The node is named
`<module path>/<op type>`. The quantization policy and
people reading the graph in netron then see module paths. Run it before metadata is cleared.
"""

from __future__ import annotations

import ast

import onnx_ir as ir

WEIGHT_INPUT = {"MatMul": 1, "Gemm": 1, "Gather": 0}
SCOPES_KEY = "pkg.torch.onnx.name_scopes"


class NameWeightsPass(ir.passes.InPlacePass):
    """`strip_prefix` is the exporter wrapper's attribute path (e.g. "model.") to drop."""

    def __init__(self, strip_prefix: str = ""):
        super().__init__()
        self.strip_prefix = strip_prefix

    def _strip(self, name: str) -> str:
        return name[len(self.strip_prefix):] if name.startswith(self.strip_prefix) else name

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph, modified, renamed = model.graph, False, set()
        taken = set(graph.initializers)
        node_names = {node.name for node in graph}
        for node in graph:
            index = WEIGHT_INPUT.get(node.op_type)
            scopes = node.metadata_props.get(SCOPES_KEY)
            if index is None or scopes is None or len(node.inputs) <= index:
                continue
            weight = node.inputs[index]
            if weight is None or weight.name not in graph.initializers:
                continue
            module = self._strip(ast.literal_eval(scopes)[-2])
            if f"{module}/{node.op_type}" not in node_names:
                node.name = f"{module}/{node.op_type}"
                node_names.add(node.name)
            modified = True
            if weight.name in renamed:
                continue
            current = self._strip(weight.name)
            name = current if current.startswith(module + ".") else f"{module}.weight"
            if name != weight.name and name not in taken:
                graph.initializers.pop(weight.name)
                taken.discard(weight.name)
                weight.name = name
                graph.register_initializer(weight)
                taken.add(name)
            renamed.add(weight.name)
        return ir.passes.PassResult(model, modified)
