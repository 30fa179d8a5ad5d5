"""Trace a transformers MoE model to ONNX with one `moec::MoE` node per sparse layer.

Each sparse block is swapped for `TracedMoE`, which computes the router logits and shared
experts with ordinary torch code and hands the routed experts to the `moec::moe` custom op;
torch.onnx translates that op into a single `moec::MoE` node carrying the expert weights as
initializers and the routing as attributes (see moec.ops.moe).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Mapping
from typing import NamedTuple

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from moec.adapters import Adapter, MoEBlock
from moec.errors import MoecError
from moec.ops import moe as moe_op
from moec.passes.name_weights import NameWeightsPass
from moec.passes.transpose_weights import TransposeWeightsPass


@torch.library.custom_op("moec::moe", mutates_args=())
def moe(hidden: torch.Tensor, router_logits: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
        down: torch.Tensor, gate_bias: torch.Tensor | None, up_bias: torch.Tensor | None,
        down_bias: torch.Tensor | None, score_bias: torch.Tensor | None, layer: int, top_k: int,
        scoring: str, normalize: bool, scaling: float, n_group: int, topk_group: int,
        jitter_eps: float, activation: str, swiglu_alpha: float, swiglu_limit: float, beta: float,
        protect_fraction: float) -> torch.Tensor:
    """Eager body: the NumPy reference, so PyTorch and ONNX share one definition of the op."""
    spec = moe_op.MoESpec(layer, top_k, scoring, normalize, scaling, n_group, topk_group,
                          jitter_eps, activation, swiglu_alpha, swiglu_limit, beta, protect_fraction)
    as_np = lambda t: None if t is None else t.detach().float().cpu().numpy()  # noqa: E731
    out = moe_op.moe_reference(*(as_np(t) for t in (hidden, router_logits, gate, up, down, gate_bias,
                                                     up_bias, down_bias, score_bias)), spec=spec)
    return torch.from_numpy(out).to(hidden.dtype)


@moe.register_fake
def _(hidden, *args, **kwargs):
    return torch.empty_like(hidden)


@functools.cache
def _moe_onnxscript_op():
    import onnxscript

    return onnxscript.values.Op(onnxscript.values.Opset(moe_op.DOMAIN, 1), moe_op.OP_TYPE, moe_op.op_schema())


def _onnx_moe(hidden, router_logits, gate, up, down, gate_bias, up_bias, down_bias, score_bias,
              *attrs):
    """torch.onnx translation of moec::moe: one moec::MoE node."""
    op = _moe_onnxscript_op()
    names = [f.name for f in dataclasses.fields(moe_op.MoESpec)]
    attributes = {n: (int(v) if isinstance(v, bool) else v) for n, v in zip(names, attrs)}
    return op(hidden, router_logits, gate, up, down, gate_bias, up_bias, down_bias, score_bias,
              **attributes)


class TracedMoE(nn.Module):
    """A sparse block rewritten as: router linear → moec::moe → + shared experts."""

    BLOCK_FIELDS = ("router_weight", "router_bias", "score_bias", "gate", "up", "down",
                    "gate_bias", "up_bias", "down_bias")

    def __init__(self, block: MoEBlock, returns_router_scores: bool):
        super().__init__()
        self.spec = block.spec
        self.returns_router_scores = returns_router_scores
        for name in self.BLOCK_FIELDS:
            tensor = getattr(block, name)
            self.register_buffer(name, None if tensor is None else tensor.contiguous())
        self.shared = block.shared

    def forward(self, hidden_states):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        logits = nn.functional.linear(x, self.router_weight, self.router_bias)
        s = self.spec
        y = torch.ops.moec.moe(x, logits, self.gate, self.up, self.down, self.gate_bias, self.up_bias,
                               self.down_bias, self.score_bias, s.layer, s.top_k, s.scoring,
                               s.normalize, s.scaling, s.n_group, s.topk_group, s.jitter_eps,
                               s.activation, s.swiglu_alpha, s.swiglu_limit, s.beta, s.protect_fraction)
        if self.shared is not None:
            y = y + self.shared(x)
        y = y.reshape(shape)
        return (y, None) if self.returns_router_scores else y


class WeightSource(NamedTuple):
    """Where a weight of the swapped model comes from: the original model's state key `key`, or
    (field set) that field of the MoEBlock the adapter reads from the sparse block at path `key`."""

    key: str
    field: str | None = None


def swap_moe_blocks(model: nn.Module, adapter: Adapter) -> tuple[list[MoEBlock], dict[str, WeightSource]]:
    """Replace every sparse block of `model` in place by a TracedMoE; returns the blocks and the
    source of each weight of the swapped model (by its state key)."""
    tensors = lambda m: [*m.named_parameters(remove_duplicate=False), *m.named_buffers(remove_duplicate=False)]  # noqa: E731
    original = {id(t): name for name, t in tensors(model)}
    blocks = adapter.blocks(model)
    for block in blocks:
        parent_path, _, attr = block.path.rpartition(".")
        setattr(model.get_submodule(parent_path), attr,
                TracedMoE(block, adapter.returns_router_scores))
    sources = {}
    for block in blocks:
        for field in TracedMoE.BLOCK_FIELDS:
            if getattr(block, field) is not None:
                sources[f"{block.path}.{field}"] = WeightSource(block.path, field)
    for name, tensor in tensors(model):
        if name not in sources:
            sources[name] = WeightSource(original[id(tensor)])
    return blocks, sources


class KVCacheModel(nn.Module):
    """Flat KV-cache signature: (input_ids, attention_mask, position_ids, past...) →
    (logits, present...), the naming optimum and onnxruntime-genai use."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=list(zip(past[0::2], past[1::2])))
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, past_key_values=cache, use_cache=True)
        presents = []
        for layer in out.past_key_values.layers:
            presents += [layer.keys, layer.values]
        return (out.logits, *presents)


def kv_shapes(model: nn.Module, batch: int, past: int) -> list[tuple[int, ...]]:
    """Each layer's cached key and value shapes, probed by running one token: the layout is the
    model's own (DeepSeek-V3 caches its compressed MLA latent, not per-head keys and values)."""
    from transformers import DynamicCache

    with torch.no_grad():
        out = model(input_ids=torch.zeros(1, 1, dtype=torch.int64), past_key_values=DynamicCache(),
                    use_cache=True)
    return [(batch, t.shape[1], past, t.shape[3])
            for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def trace(model: nn.Module, weights: Mapping[str, Callable[[], np.ndarray]], opset: int = 21) -> ir.Model:
    """Export a swapped model with a KV cache; dynamic batch, sequence and past length.

    The model is a skeleton on the meta device: the graph comes from shapes alone, and
    `weights[state key]()` gives each weight's value when the artifact's bytes are written, so a
    compile never holds more than the part of the model it is writing.
    """
    from torch.export import Dim

    import logging
    import warnings

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    batch, seq, past = 2, 3, 5
    with torch.device(next(model.parameters()).device):
        input_ids = torch.randint(0, model.config.vocab_size, (batch, seq))
        attention_mask = torch.ones(batch, past + seq, dtype=torch.int64)
        position_ids = torch.arange(past, past + seq).expand(batch, seq).contiguous()
        pasts = [torch.zeros(s) for s in kv_shapes(model, batch, past)]
    dyn = Dim.DYNAMIC
    dynamic_shapes = ({0: dyn, 1: dyn}, {0: dyn, 1: dyn}, {0: dyn, 1: dyn},
                      tuple({0: dyn, 2: dyn} for _ in pasts))
    inputs, outputs = io_names(model.config.num_hidden_layers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            KVCacheModel(model).eval(), (input_ids, attention_mask, position_ids, *pasts),
            dynamo=True, opset_version=opset, input_names=inputs, output_names=outputs,
            dynamic_shapes=dynamic_shapes, optimize=False, verbose=False,
            custom_translation_table={torch.ops.moec.moe.default: _onnx_moe},
        )
        bind_weights(program.model, weights, strip_prefix="model.")
        TransposeWeightsPass()(program.model)  # before the constant folder, which would materialize them
        program.optimize()
    model = program.model
    name_dynamic_axes(model)
    NameWeightsPass(strip_prefix="model.")(model)  # KVCacheModel's attribute
    return model


def bind_weights(model: ir.Model, weights: Mapping[str, Callable[[], np.ndarray]], strip_prefix: str) -> None:
    """Give every initializer exported from a meta-device tensor a lazy value read by `weights`."""
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if not getattr(getattr(tensor, "raw", None), "is_meta", False):  # torch.onnx's TorchTensor
            continue
        key = name.removeprefix(strip_prefix)
        if key not in weights:
            raise MoecError(f"the traced graph has a weight {key!r} that no module of the model holds")
        value.const_value = ir.LazyTensor(functools.partial(_read, weights[key], tensor.dtype),
                                          dtype=tensor.dtype, shape=tensor.shape, name=name)


def _read(read: Callable[[], np.ndarray], dtype: ir.DataType) -> ir.Tensor:
    return ir.tensor(np.asarray(read(), dtype=dtype.numpy()))  # a view when it can be: no stack copies


def name_dynamic_axes(model: ir.Model) -> None:
    """Replace torch.export's symbols (s10, s15 + s70) by batch / sequence / past_sequence."""
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {1: "total_sequence"},
            "past_key_values.0.key": {2: "past_sequence"}}
    symbols = {}
    for value in model.graph.inputs:
        for axis, name in axes.get(value.name, {}).items():
            symbols[str(value.shape[axis])] = name
    symbols[str(next(v for v in model.graph.inputs if v.name == "attention_mask").shape[0])] = "batch"
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, symbols)) + r")\b")

    def rename(value):
        if value.shape is not None:
            value.shape = ir.Shape([pattern.sub(lambda m: symbols[m.group(0)], d.value)
                                    if isinstance(d, ir.SymbolicDim) and d.value else d
                                    for d in value.shape])

    for value in [*model.graph.inputs, *model.graph.outputs]:
        rename(value)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for value in node.outputs:
            rename(value)
