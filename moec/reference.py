"""The PyTorch side of every numeric check: the transformers model computed as the artifact
computes it, one decoder layer materialized at a time.

The family's own code computes everything but the routed experts, which run through moec's
"moec_reference" experts implementation (moec.experts): the moec::Experts NumPy reference with
each expert's weights upcast to fp32 (and quantized and dequantized, where the artifact quantizes
them) only while that expert runs. The experts stay in the checkpoint's dtype (see
moec.weights.StreamingModel.keep_stored), so a bf16 Mixtral-8x7B block never exists in fp32 as a whole.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import torch

from moec.experts import REFERENCE_IMPLEMENTATION, set_implementation
from moec.ops.moe import EXPERT_WEIGHT_PATTERN
from moec.ops.routes import PRUNING_FIELDS, RoutesSpec


def streamed_reference(stream, layers, prompt: np.ndarray, decode_steps: int, past_names: list[str], specs: dict,
                       routing: dict) -> list[dict[str, np.ndarray]]:
    """What the transformers model computes for `prompt` [1, S] and then `decode_steps` greedy tokens,
    one forward per step with the cache the model keeps for itself (so the check does not lean on
    moec's own reading of caches): per step its `input_ids`, `logits` and, for each past the artifact
    takes, the cache's tensor under the present's name. Each part (decoder layer, embeddings, head, ...)
    is materialized only for its own call. Where `specs` (moec.policy.quantization_specs) has a weight
    the reference computes with it quantized and dequantized, and a layer in `routing`
    (moec.policy.layer_routing) prunes and drops experts as planned."""
    from moec.runtime import present_name
    from moec.trace import cache_tensor, past_slot
    from moec.weights import part_of

    model = stream.model
    set_implementation(model, REFERENCE_IMPLEMENTATION)
    handles = configure_experts(model, layers, specs, routing)
    decoder_layers = stream.layer_paths()
    tensors = [name for name, _ in [*model.named_parameters(), *model.named_buffers()]]
    parts = sorted({part_of(name.rpartition(".")[0], decoder_layers) for name in tensors})
    try:
        for path in parts:  # each part materialized for its call, its non-expert weights as the artifact has them
            module = model.get_submodule(path)
            handles += [module.register_forward_pre_hook(lambda *_, path=path: _load(stream, path, specs)),
                        module.register_forward_hook(lambda *_, path=path: stream.unload(path))]
        steps, ids, cache, seen = [], torch.from_numpy(prompt), None, 0
        with torch.no_grad():
            for _ in range(1 + decode_steps):
                total = seen + ids.shape[1]
                out = model(input_ids=ids, attention_mask=torch.ones(ids.shape[0], total, dtype=torch.int64),
                            position_ids=torch.arange(seen, total)[None], cache=cache, use_cache=True)
                cache, seen = out.cache, total
                # copies: the model updates its cache's tensors in place on the next step
                steps.append({"input_ids": ids.numpy(), "logits": out.logits.float().numpy().copy(),
                              **{present_name(name): cache_tensor(cache, layer, slot).float().numpy().copy()
                                 for name in past_names for layer, slot in [past_slot(name)]}})
                ids = out.logits[:, -1:].argmax(-1)
        return steps
    finally:
        for handle in handles:
            handle.remove()
        for path in parts:  # what a forward that raised left materialized
            stream.unload(path)
        configure_experts(model, layers, {}, {})


def configure_experts(model, layers, quantizers: dict, routing: dict) -> list:
    """Give each experts module the quantizers of its weights and its layer's routing changes
    (pruning, which the reference implementation computes with, or for a module that routes for
    itself its moec::routes hook; dropped experts, masked out of its block's router by
    moec.experts.RoutingMask); the handles of the hooks that mask them."""
    from moec.experts import drop_experts

    handles = []
    for layer in layers:
        module = model.get_submodule(layer.path)
        change = routing.get(layer.layer, {})
        if hasattr(module, "moec_routes"):
            pruning = {name: value for name, value in change.items() if name in PRUNING_FIELDS}
            module.moec_routes = RoutesSpec(module.moec_routes.layer, module.moec_routes.num_experts, **pruning)
            change = {name: value for name, value in change.items() if name not in PRUNING_FIELDS}
            change["sentinel"] = module.moec_routes.prunes
        module.moec_spec = dataclasses.replace(layer.spec, **change)
        module.moec_quantizers = quantizers
        if module.moec_spec.dropped:
            handles += drop_experts(model.get_submodule(layer.block_path), layer.num_experts, module.moec_spec.dropped)
    return handles


def _load(stream, path: str, quantizers: dict) -> None:
    stream.load(path)
    set_dequantized_weights(stream.model, path, quantizers)


def set_dequantized_weights(model, part: str, quantizers: dict) -> None:
    """Give the non-expert weights of the part at `part` the values the artifact computes with:
    each one `quantizers` has, quantized and dequantized (routed experts: see moec.experts)."""
    for name, quantizer in quantizers.items():
        if name.startswith(part + ".") and not re.fullmatch(EXPERT_WEIGHT_PATTERN, name):
            weight = model.get_parameter(name)  # a module's weight, or a bare parameter (Inkling's `proj`)
            weight.data.copy_(torch.from_numpy(quantizer(weight.detach().numpy()).dequantize()).reshape(weight.shape))
