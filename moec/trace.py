"""Trace a transformers MoE model to ONNX with one `moec::Experts` node per sparse layer.

The model runs its experts through moec's "moec" implementation of transformers' experts
interface (moec.experts): the family's own code computes the router, shared experts, attention
and norms, and torch.onnx turns each `moec::experts` call into a single `moec::Experts` node
carrying the experts' stacked weights as initializers and their layout as attributes (see
moec.ops.moe).
"""

from __future__ import annotations

import contextlib
import functools
import os
import types
from collections.abc import Callable, Mapping
from typing import NamedTuple
from unittest import mock
import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from moec.compressed_attention import exportable_compressed_attention
from moec.errors import MoecError, Unsupported, error_chain
from moec.linear_attention import (exportable_lightning_attention, exportable_linear_attention,
                                   onnx_gated_delta_rule, onnx_selective_scan)
from moec.ops import moe as moe_op
from moec.ops import routes as routes_op
from moec.passes.name_weights import NameWeightsPass
from moec.passes.transpose_weights import STORED_AS_IS, TransposeWeightsPass
from moec.runtime import present_name
from moec.sparse_attention import (exportable_block_selection, exportable_kolibri_selection,
                                   exportable_minimax_m3_selection)


@functools.cache
def _experts_onnxscript_op():
    import onnxscript

    return onnxscript.values.Op(onnxscript.values.Opset(moe_op.DOMAIN, 1), moe_op.OP_TYPE, moe_op.op_schema())


def _onnx_experts(hidden, top_k_index, top_k_weights, gate_up, down, gate_up_bias, down_bias, *attrs):
    """torch.onnx translation of moec::experts: one moec::Experts node."""
    return _experts_onnxscript_op()(hidden, top_k_index, top_k_weights, gate_up, down, gate_up_bias, down_bias,
                                    **moe_op.ExpertsSpec(*attrs).attributes())


@functools.cache
def _routes_onnxscript_op():
    import onnxscript

    return onnxscript.values.Op(onnxscript.values.Opset(moe_op.DOMAIN, 1), routes_op.OP_TYPE, routes_op.op_schema())


def _onnx_routes(hidden, top_k_index, top_k_weights, *attrs):
    """torch.onnx translation of moec::routes: one moec::Routes node."""
    return _routes_onnxscript_op()(hidden, top_k_index, top_k_weights, **routes_op.RoutesSpec(*attrs).attributes())


class KVCacheModel(nn.Module):
    """Flat cache signature: (input_ids, attention_mask, position_ids, past...) → (logits, present...),
    the naming optimum and onnxruntime-genai use. `past_names` name each past input
    `past_key_values.{layer}.{slot}`: slots key and value for attention layers, conv and recurrent
    for a linear-attention or SSM layer's state (transformers' LinearAttentionLayer), indexer_key for
    a sparse-attention indexer's keys and indexer_position for the positions it has seen (the
    multimodal rotary's, which Qwen4-Exp's indexer keeps), and a family's own cache layer's further
    tensors by their attribute names (MiniMax-M3's idx_keys) or, kept in a dict, as `{key}_{attribute}`
    (DeepSeek-V4's indexer_compressed_kv). `cache_class` is the cache the model builds for itself;
    `own_layers` the layers kept in a cache layer class of the family's own, with the counts each keeps
    (CacheLayout.own_layers)."""

    def __init__(self, model: nn.Module, past_names: list[str], cache_class: type,
                 own_layers: Mapping[int, Mapping] | None = None):
        super().__init__()
        self.model = model
        self.slots = [past_slot(name) for name in past_names]
        self.cache_class = cache_class
        self.own_layers = own_layers or {}

    def forward(self, input_ids, attention_mask, position_ids, *past):
        layers = max(self.model.config.num_hidden_layers, 1 + max((layer for layer, _ in self.slots), default=0))
        if hasattr(self.cache_class, "set_linear_cache"):
            cache = _cache_beside_layers(self.cache_class, layers, self.slots, past)
        else:
            cache = _cache(layers, self.slots, past, attention_mask.shape[1] - input_ids.shape[1])
            _fill_own_layers(cache, self.model.config, self.own_layers, _by_layer(layers, self.slots, past))
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, cache=cache, use_cache=True)
        return (out.logits, *[cache_tensor(out.cache, layer, slot) for layer, slot in self.slots])


# a linear-attention layer's state kinds (transformers' LinearAttentionLayer keeps `{kind}_states`, one
# per state index): slot `conv` or `recurrent` for its first state, `conv{k}` or `recurrent{k}` for
# state k of a layer that keeps several (Inkling's four short convolutions)
STATE_KINDS = ("conv", "recurrent")
# the slots that grow by a token per step, kept by a cache layer as `{slot}s`, and their token axis:
# keys and values [batch, kv heads, tokens, head size]; a sparse-attention indexer's keys
# (transformers' DynamicIndexedLayer) [batch, tokens, index head size], and the position ids its
# rotary has seen, [batch, rotary sections, tokens] (the layer keeps them batch second)
SEQUENCE_AXIS = {"key": 2, "value": 2, "indexer_key": 1, "indexer_position": 2}
PAST_DTYPES = {"indexer_position": torch.int64}  # the others are the model's float


def past_slot(name: str) -> tuple[int, str]:
    """past_key_values.{layer}.{slot} -> (layer, slot)."""
    _, layer, slot = name.split(".")
    return int(layer), slot


def state_slot(slot: str) -> tuple[str, int] | None:
    """A state slot's (kind, state index): conv -> (conv, 0), recurrent2 -> (recurrent, 2); None for
    keys, values and indexer keys."""
    kind = slot.rstrip("0123456789")
    return (kind, int(slot[len(kind):] or 0)) if kind in STATE_KINDS else None


def _state_name(kind: str, index: int) -> str:
    return kind if index == 0 else f"{kind}{index}"


def _by_layer(num_layers: int, slots: list[tuple[int, str]], past) -> list[dict]:
    """Each layer's past tensors by slot."""
    tensors: list[dict] = [{} for _ in range(num_layers)]
    for (layer, slot), tensor in zip(slots, past):
        tensors[layer][slot] = tensor
    return tensors


def _cache(num_layers: int, slots: list[tuple[int, str]], past, past_length):
    """A DynamicCache holding `past` (`past_length` tokens): keys and values in DynamicLayers, conv
    and recurrent state in LinearAttentionLayers marked as continuing (a fresh sequence's state is
    zeros, which is what transformers starts from) and counting the tokens they have seen (since
    transformers 5.25 a cache's sequence length, and so the masks' query offset, is read from its
    first layer, which may be a linear one), both in a LinearAttentionAndFullAttentionLayer, and a
    DummyLayer where a layer caches nothing."""
    from transformers import DynamicCache
    from transformers.cache_utils import (DummyLayer, DynamicIndexedLayer, LinearAttentionAndFullAttentionLayer,
                                          LinearAttentionLayer)

    tensors = _by_layer(num_layers, slots, past)
    cache = DynamicCache(ddp_cache_data=[(t.get("key"), t.get("value")) for t in tensors])
    for i, t in enumerate(tensors):
        if not t:
            cache.layers[i] = DummyLayer()
        elif "indexer_key" in t:
            layer = DynamicIndexedLayer()
            layer.update(t["key"], t["value"])
            layer.update_indexer(t["indexer_key"])
            if "indexer_position" in t:
                layer.indexer_position_ids = t["indexer_position"].transpose(0, 1)
            cache.layers[i] = layer
        elif states := {state_slot(slot): tensor for slot, tensor in t.items() if state_slot(slot)}:
            count = 1 + max(index for _, index in states)
            layer = (LinearAttentionAndFullAttentionLayer if "key" in t else LinearAttentionLayer)(number_of_states=count)
            if "key" in t:
                layer.update(t["key"], t["value"])
            for (kind, index), tensor in states.items():
                getattr(layer, f"{kind}_states")[index] = tensor.clone()  # cloned: transformers updates in place
                getattr(layer, f"is_{kind}_states_initialized")[index] = True
                layer.dtype, layer.device = tensor.dtype, tensor.device
                if kind == "conv":
                    layer.conv_kernel_size[index] = tensor.shape[-1]
                layer.has_previous_state[index] = True
            layer.cumulative_length_linear = torch.tensor(past_length)
            cache.layers[i] = layer
    return cache


def _cache_beside_layers(cache_class: type, num_layers: int, slots: list[tuple[int, str]], past):
    """A cache that keeps its linear-attention states beside its layers (MiniMax's MiniMaxCache: a
    `linear_cache` list), filled through its own methods as the model fills it."""
    cache = cache_class()
    tensors = _by_layer(num_layers, slots, past)
    for i, t in enumerate(tensors):
        if "key" in t:
            cache.update(t["key"], t["value"], i)
        if "recurrent" in t:
            cache.set_linear_cache(i, t["recurrent"])
    return cache


def _fill_own_layers(cache, config, own_layers: Mapping[int, Mapping], tensors: list[dict]) -> None:
    """Put a family's own cache layers (MiniMax-M3's sparse-attention layer, DeepSeek-V4's compressed
    attention) in `cache`, built as transformers builds them from the config, holding their keys,
    values and further tensors, and the counts they keep as the lengths of the axes that carry them.
    A sliding-window layer keeps every token here, as moec keeps every sliding-window layer: the
    model's mask holds the window."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    fresh = DynamicCache(config=config).layers
    for i, counts in own_layers.items():
        layer, t = fresh[i], dict(tensors[i])
        if isinstance(layer, DynamicSlidingWindowLayer):
            for method in ("update", "get_mask_sizes", "get_seq_length"):
                setattr(layer, method, types.MethodType(getattr(DynamicLayer, method), layer))
            layer.is_sliding = False
        key = t.pop("key")
        layer.update(key, t.pop("value", key))  # a layer whose values are its keys carries them once
        for slot, tensor in t.items():
            _set_own(layer, slot, tensor)
        for (attribute, entry), (slot, axis) in counts.items():
            getattr(layer, attribute)[entry] = t[slot].shape[axis]
        cache.layers[i] = layer


def _own_tensors(layer) -> dict[str, torch.Tensor]:
    """The tensors a family's own DynamicLayer subclass keeps beyond keys and values: its public
    tensor attributes by name, and the tensors it keeps in dicts (DeepSeek-V4's compressor states,
    `buffer_kv["indexer"]`) as `{key}_{attribute}` (`indexer_buffer_kv`)."""
    tensors = {}
    for name, held in vars(layer).items():
        if isinstance(held, torch.Tensor) and name not in ("keys", "values") and not name.startswith("_"):
            tensors[name] = held
        elif isinstance(held, dict):
            tensors |= {f"{key}_{name}": t for key, t in held.items() if isinstance(t, torch.Tensor)}
    return tensors


def _own_counts(layer) -> dict[tuple[str, str], int]:
    """The counts a family's own cache layer keeps in dicts (DeepSeek-V4's `entry_count["indexer"]`)."""
    return {(name, key): value for name, held in vars(layer).items() if isinstance(held, dict)
            for key, value in held.items() if isinstance(value, int) and not isinstance(value, bool)}


def _own_slot(layer, slot: str) -> tuple[str, str | None]:
    """The attribute (and dict key) holding a family's own cache layer's tensor `slot`."""
    for name, held in vars(layer).items():
        if isinstance(held, dict) and any(slot == f"{key}_{name}" for key in held):
            return name, slot.removesuffix(f"_{name}")
    return slot, None


def _set_own(layer, slot: str, tensor: torch.Tensor) -> None:
    attribute, key = _own_slot(layer, slot)
    if key is None:
        setattr(layer, attribute, tensor)
    else:
        getattr(layer, attribute)[key] = tensor


def cache_tensor(cache, layer: int, slot: str):
    """A cache's tensor of a layer's slot: its keys or values (or indexer keys), its (first) conv or
    recurrent state, which a cache that keeps them beside its layers (MiniMax's) keeps in `linear_cache`,
    or a family's own cache layer's tensor of that name."""
    if slot == "recurrent" and hasattr(cache, "linear_cache"):
        return cache.linear_cache[layer]
    layer = cache.layers[layer]
    if slot == "indexer_position":
        return layer.indexer_position_ids.transpose(0, 1)
    if slot in SEQUENCE_AXIS:
        return getattr(layer, f"{slot}s")
    if state := state_slot(slot):
        kind, index = state
        return getattr(layer, f"{kind}_states")[index]
    attribute, key = _own_slot(layer, slot)
    return getattr(layer, attribute) if key is None else getattr(layer, attribute)[key]


class CacheLayout(NamedTuple):
    """The past inputs a model's cache makes: each one's shape and, where it grows, its growing axis and
    that axis's name; the cache's class; the layers kept in a cache layer class of the family's own,
    each with the counts it keeps and the (slot, axis) whose length carries each."""
    shapes: dict[str, tuple[int, ...]]
    sequence_axes: dict[str, int]
    axis_names: dict[str, str]
    cache_class: type
    own_layers: dict[int, dict[tuple[str, str], tuple[str, int]]]


# the prefills (besides the first probe's one token) that tell which axes of a family's own cache
# tensors vary, and which counts they carry: longer than the windows compressed caches pool
# (DeepSeek-V4's heavily compressed attention: 128 tokens); on the meta device a length costs nothing
OWN_PROBE_LENGTHS = (2, 1031)


def cache_inputs(model: nn.Module, batch: int, past: int) -> CacheLayout:
    """The past inputs, probed by running one token with the cache the family builds for itself: the
    layout is the model's own (DeepSeek-V3 caches its compressed MLA latent, not per-head keys and
    values; Qwen3-Next's linear-attention layers keep a conv and a recurrent state; DeepSeek-V3.2's
    indexer its own keys; MiniMax its lightning attention's state beside the layers). A family's own
    DynamicLayer subclass carries each further tensor it keeps (MiniMax-M3's indexer keys, DeepSeek-V4's
    compressor buffers and entries): see _own_layout. A layer whose cache holds anything else is
    refused by name."""
    from transformers.cache_utils import (DummyLayer, DynamicCache, DynamicIndexedLayer, DynamicLayer,
                                          DynamicSlidingWindowLayer, LinearAttentionAndFullAttentionLayer,
                                          LinearAttentionAndSlidingWindowAttentionLayer, LinearAttentionLayer)

    with torch.no_grad():
        out = model(input_ids=torch.zeros(1, 1, dtype=torch.int64), use_cache=True)
    linear = getattr(out.cache, "linear_cache", None)  # linear-attention states beside the layers (MiniMax)
    if type(out.cache) is not DynamicCache and not (isinstance(out.cache, DynamicCache) and isinstance(linear, list)):
        raise Unsupported(model.config.model_type, "cache", f"the model keeps its own cache class "
                          f"{type(out.cache).__name__}, which moec does not export yet")
    shapes, own = {}, []
    for i, state in enumerate(linear or []):
        if isinstance(state, torch.Tensor):
            shapes[f"past_key_values.{i}.recurrent"] = (batch, *state.shape[1:])
    for i, layer in enumerate(out.cache.layers):
        if type(layer) is DummyLayer or (type(layer) is DynamicLayer and not layer.is_initialized):
            continue  # an MLP-only layer, or one whose state the cache keeps beside it: nothing to carry
        known = type(layer) in (DynamicLayer, DynamicSlidingWindowLayer, DynamicIndexedLayer, LinearAttentionLayer,
                                LinearAttentionAndFullAttentionLayer, LinearAttentionAndSlidingWindowAttentionLayer)
        if not known and isinstance(layer, DynamicLayer) and layer.is_initialized and _own_tensors(layer):
            own.append(i)
        elif not known:
            raise Unsupported(model.config.model_type, "cache", f"decoder layer {i} keeps a {type(layer).__name__} "
                              "cache (state beyond keys, values, indexer keys and linear-attention states), which "
                              "moec does not export yet")
        if isinstance(layer, DynamicLayer):
            kinds = ("key",) if i in own and layer.values is layer.keys else ("key", "value")
            shapes |= {f"past_key_values.{i}.{slot}": (batch, t.shape[1], past, t.shape[3])
                       for slot, t in zip(kinds, (layer.keys, layer.values))}
        if isinstance(layer, DynamicIndexedLayer) and layer.is_indexer_initialized:
            shapes[f"past_key_values.{i}.indexer_key"] = (batch, past, layer.indexer_keys.shape[2])
        if isinstance(layer, DynamicIndexedLayer) and layer.indexer_position_ids is not None:
            shapes[f"past_key_values.{i}.indexer_position"] = (batch, layer.indexer_position_ids.shape[0], past)
        if isinstance(layer, LinearAttentionLayer):
            shapes |= {f"past_key_values.{i}.{_state_name(kind, k)}": (batch, *getattr(layer, f"{kind}_states")[k].shape[1:])
                       for kind in STATE_KINDS for k in range(layer.number_of_states)
                       if getattr(layer, f"is_{kind}_states_initialized")[k]}
    axes = {name: SEQUENCE_AXIS[past_slot(name)[1]] for name in shapes if past_slot(name)[1] in SEQUENCE_AXIS}
    names, own_layers = {}, {}
    if own:
        with torch.no_grad():
            caches = [out.cache, *(model(input_ids=torch.zeros(1, length, dtype=torch.int64), use_cache=True).cache
                                   for length in OWN_PROBE_LENGTHS)]
        own_layers = _own_layout(model.config.model_type, [[c.layers[i] for c in caches] for i in own], own,
                                 batch, past, shapes, axes, names)
    return CacheLayout(shapes, axes, names, type(out.cache), own_layers)


def _own_layout(model_type: str, probes: list[list], own: list[int], batch: int, past: int, shapes: dict,
                axes: dict, names: dict) -> dict[int, dict]:
    """Add a family's own cache layers' tensors to `shapes`, `axes` and `names` from the layers each
    probe left (`probes[n]`: layer `own[n]` after each probe), and return each layer's counts.

    An axis whose size differs between the probes varies. Axes that vary alike at every probe (both
    compressors' buffers of a layer) share one name and example size; each such group gets a size of
    its own, so export does not take two of them to be one; one that grows with the tokens is the keys'
    axis (MiniMax-M3's indexer keys). A count the layer keeps (DeepSeek-V4's
    `entry_count[name]`) is carried by the length of an axis of a tensor it keeps under the same key
    that equals it at every probe (`compressed_kv[name]`'s entries); one no axis carries is refused, as
    is a tensor that varies along two axes. A tensor that only the longest probe leaves (DeepSeek-V4's
    overlap of windows) starts as zeros, as the family's export rewrite reads it."""
    groups = {(1, *OWN_PROBE_LENGTHS): "past_sequence"}  # an axis that grows a token a token is the keys' axis
    own_layers = {}
    for i, layers in zip(own, probes):
        seen = [_own_tensors(layer) for layer in layers]
        for slot in dict.fromkeys(slot for tensors in seen for slot in tensors):
            sizes = [tensors[slot].shape if slot in tensors else None for tensors in seen]
            shape = next(s for s in reversed(sizes) if s is not None)
            varying = {axis: tuple(s[axis] if s is not None else None for s in sizes) for axis in range(1, len(shape))
                       if len({s[axis] for s in sizes if s is not None}) > 1}
            name = f"past_key_values.{i}.{slot}"
            example = list(shape)
            for axis, pattern in varying.items():
                groups.setdefault(pattern, f"{slot}_length")
                example[axis] = past + 2 * list(groups).index(pattern)
                axes[name], names[name] = axis, groups[pattern]
            if len(varying) > 1:
                raise Unsupported(model_type, "cache", f"decoder layer {i}'s {slot} varies along more than one axis, "
                                  "which moec does not export yet")
            shapes[name] = (batch, *example[1:])
        counts = {}
        for (attribute, key), value in _own_counts(layers[0]).items():
            values = [_own_counts(layer)[attribute, key] for layer in layers]
            if len(set(values)) == 1:
                continue  # a setting, the same at every probe
            carriers = [(slot, axis) for slot in seen[0] if slot.startswith(f"{key}_") and all(slot in t for t in seen)
                        for axis in range(1, seen[0][slot].dim()) if [t[slot].shape[axis] for t in seen] == values]
            if not carriers:
                raise Unsupported(model_type, "cache", f"decoder layer {i} keeps a count ({attribute}[{key!r}]) that "
                                  "no axis of its tensors carries, which moec does not export yet")
            counts[attribute, key] = carriers[0]
        own_layers[i] = counts
    return own_layers


@contextlib.contextmanager
def _real_valued_rotary(module_name: str, rotary_class: str):
    """While exporting, compute a family's complex-number rotary embedding (torch.polar and
    view_as_complex, which torch.onnx cannot translate) as the same products in real pairs:
    the embedding gives [..., dim / 2, (cos, sin)] and apply_rotary_emb rotates (x0, x1) pairs."""
    import importlib

    modeling = importlib.import_module(module_name)
    rotary = getattr(modeling, rotary_class)

    def forward(self, x, position_ids):
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        return torch.stack([freqs.cos(), freqs.sin()], dim=-1) * self.attention_scaling

    def apply_rotary_emb(xq, xk, freqs):
        cos, sin = freqs.unsqueeze(1).unbind(-1)

        def rotate(x):
            pairs = x.float().reshape(*x.shape[:-1], -1, 2)
            real, imag = pairs[..., 0], pairs[..., 1]
            return torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1).flatten(3).type_as(x)

        return rotate(xq), rotate(xk)

    saved = rotary.forward, modeling.apply_rotary_emb
    rotary.forward, modeling.apply_rotary_emb = forward, apply_rotary_emb
    try:
        yield
    finally:
        rotary.forward, modeling.apply_rotary_emb = saved


# what transformers' modeling code says in a way torch.onnx cannot export, by model_type: the same
# computation written exportably, in force while tracing
EXPORT_REWRITES = {
    "deepseek_v2": functools.partial(_real_valued_rotary, "transformers.models.deepseek_v2.modeling_deepseek_v2",
                                     "DeepseekV2RotaryEmbedding"),
    "minimax": functools.partial(exportable_lightning_attention, "transformers.models.minimax.modeling_minimax",
                                 "MiniMaxLightningAttention"),
    "kolibri1_1": functools.partial(exportable_kolibri_selection, "transformers.models.kolibri1_1.modeling_kolibri1_1",
                                    "Kolibri1_1Indexer"),
    "minimax_m3_vl_text": functools.partial(exportable_minimax_m3_selection,
                                            "transformers.models.minimax_m3_vl.modeling_minimax_m3_vl",
                                            "MiniMaxM3VLIndexer"),
    "deepseek_v4": functools.partial(exportable_compressed_attention,
                                     "transformers.models.deepseek_v4.modeling_deepseek_v4", "DeepseekV4"),
    "qwen4_exp_text": functools.partial(exportable_block_selection, "transformers.models.qwen4_exp.modeling_qwen4_exp",
                                        "Qwen4ExpTextQSAIndexer"),
}


def _export_rewrites(model: nn.Module):
    """The family's rewrite, the gated delta rule made exportable wherever the family's modeling
    module computes one, and grouped-query sdpa."""
    stack = contextlib.ExitStack()
    stack.enter_context(EXPORT_REWRITES.get(model.config.model_type, contextlib.nullcontext)())
    stack.enter_context(exportable_linear_attention(model))
    # transformers' own switch (read by integrations.sdpa_attention.use_gqa_in_sdpa) for calling
    # scaled_dot_product_attention with `enable_gqa`, keys and values per KV head, instead of repeating
    # them per query head first: the Attention node then reads the cache as it is
    stack.enter_context(mock.patch.dict(os.environ, {"TRANSFORMERS_SDPA_FORCE_GQA": "1"}))
    return stack


# ONNX opset 23 has Attention (grouped-query, with the mask), RotaryEmbedding and RMSNormalization:
# torch.onnx writes transformers' scaled_dot_product_attention as one Attention node and onnxscript's
# optimizer folds the rotary and the norms into theirs, so a decode step runs a quarter fewer nodes
# (Mixtral-proportioned, 8 layers: 884 against 1,256; decode 121 against 97 tok/s, 2 threads)
OPSET = 23


def trace(model: nn.Module, weights: Mapping[str, Callable[[], np.ndarray]], opset: int = OPSET) -> ir.Model:
    """Export a model with a KV cache, its experts as moec::Experts nodes (the model's experts
    modules tagged by moec.experts.experts_layers) and its attention as opset 23 Attention nodes;
    dynamic batch, sequence and past length.

    The model is a skeleton on the meta device: the graph comes from shapes alone, and
    `weights[state key]()` gives each weight's value when the artifact's bytes are written, so a
    compile never holds more than the part of the model it is writing.
    """
    import logging

    from moec.experts import TRACE_IMPLEMENTATION, set_implementation

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    # its constant folder warns of each Split it leaves to onnxruntime (DeepSeek-V4's hyper-connections)
    logging.getLogger("onnxscript.optimizer").setLevel(logging.ERROR)
    set_implementation(model, TRACE_IMPLEMENTATION)
    with _export_errors(model.config.model_type):
        return _trace(model, weights, opset)


@contextlib.contextmanager
def _export_errors(model_type: str):
    """A model torch.onnx cannot export (or run on the meta device) is refused in one line naming the
    cause; a MoecError (a checkpoint read while exporting) stays itself."""
    try:
        yield
    except MoecError:
        raise
    except Exception as e:
        chain = list(error_chain(e))
        cause = next((c for c in chain if isinstance(c, MoecError)), chain[-1])
        if isinstance(cause, MoecError):
            raise cause from None
        text = str(cause).strip()
        first = text.splitlines()[0][:200] if text else ""
        raise Unsupported(model_type, "export", f"torch.onnx cannot export it ({type(cause).__name__}: {first})") \
            from None


def _trace(model: nn.Module, weights: Mapping[str, Callable[[], np.ndarray]], opset: int) -> ir.Model:
    import warnings

    batch, seq, past = 2, 3, 5
    model.requires_grad_(False)  # the same graph, exported a sixth faster (no autograd bookkeeping)
    # the rewrites hold for the cache probe too: it runs the model's code on the same meta device
    with warnings.catch_warnings(), _export_rewrites(model), torch.no_grad():
        warnings.simplefilter("ignore")
        with torch.device(next(model.parameters()).device):
            input_ids = torch.randint(0, model.config.vocab_size, (batch, seq))
            attention_mask = torch.ones(batch, past + seq, dtype=torch.int64)
            position_ids = torch.arange(past, past + seq).expand(batch, seq).contiguous()
            layout = cache_inputs(model, batch, past)
            shapes = layout.shapes
            pasts = [torch.zeros(s, dtype=PAST_DTYPES.get(past_slot(name)[1])) for name, s in shapes.items()]
        tokens = {0: "batch", 1: "sequence"}
        dynamic_shapes = (tokens, {0: "batch", 1: "total_sequence"}, tokens,  # torch.onnx names the axes
                          tuple({0: "batch", layout.sequence_axes[name]: layout.axis_names.get(name, "past_sequence")}
                                if name in layout.sequence_axes else {0: "batch"} for name in shapes))
        inputs = ["input_ids", "attention_mask", "position_ids", *shapes]
        outputs = ["logits", *map(present_name, shapes)]
        program = torch.onnx.export(
            KVCacheModel(model, list(shapes), layout.cache_class, layout.own_layers).eval(),
            (input_ids, attention_mask, position_ids, *pasts),
            dynamo=True, opset_version=opset, input_names=inputs, output_names=outputs,
            dynamic_shapes=dynamic_shapes, optimize=False, verbose=False,
            custom_translation_table={torch.ops.moec.experts.default: _onnx_experts,
                                      torch.ops.moec.routes.default: _onnx_routes,
                                      torch.ops.moec.gated_delta_rule.default: onnx_gated_delta_rule,
                                      torch.ops.moec.selective_scan.default: onnx_selective_scan},
        )
        bind_weights(program.model, weights, strip_prefix="model.")
        TransposeWeightsPass()(program.model)  # before the constant folder, which would materialize them
        program.optimize()
    model = program.model
    NameWeightsPass(strip_prefix="model.")(model)  # KVCacheModel's attribute
    return model


def bind_weights(model: ir.Model, weights: Mapping[str, Callable[[], np.ndarray]], strip_prefix: str) -> None:
    """Give every initializer exported from a meta-device tensor a lazy value read by `weights`,
    marked as the checkpoint's tensor in its stored layout (STORED_AS_IS)."""
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if not getattr(getattr(tensor, "raw", None), "is_meta", False):  # torch.onnx's TorchTensor
            continue
        key = name.removeprefix(strip_prefix)
        if key not in weights:
            raise MoecError(f"the traced graph has a weight {key!r} that no module of the model holds")
        value.const_value = ir.LazyTensor(functools.partial(_read, weights[key], tensor.dtype),
                                          dtype=tensor.dtype, shape=tensor.shape, name=name)
        value.meta[STORED_AS_IS] = True


def _read(read: Callable[[], np.ndarray], dtype: ir.DataType) -> ir.Tensor:
    return ir.tensor(np.asarray(read(), dtype=dtype.numpy()))  # a view when it can be: no stack copies
