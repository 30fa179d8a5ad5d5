"""The PyTorch side of every numeric check: the transformers model computed as the artifact
computes it, one decoder layer materialized at a time.

A sparse block is computed by `ReferenceMoE`: the router in torch, the routed experts by the
moec::MoE NumPy reference with each expert's weights upcast to fp32 (and quantized and
dequantized, where the artifact quantizes them) only while that expert runs. The experts stay
in the checkpoint's dtype (see moec.weights.StreamingModel.keep_stored), so a bf16 Mixtral-8x7B
block never exists in fp32 as a whole.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from moec.adapters import MoEBlock
from moec.ops.moe import EXPERT_WEIGHT_PATTERN, PROJECTIONS, expert_weight_name, moe_reference


class ReferenceMoE(nn.Module):
    """A sparse block as the artifact computes it; `quantizers` (weight name -> Quantizer) gives
    the routed experts the artifact quantizes."""

    def __init__(self, block: MoEBlock, returns_router_scores: bool, quantizers: dict | None = None):
        super().__init__()
        self.block, self.returns_router_scores = block, returns_router_scores
        self.quantizers = quantizers or {}
        self.shared = block.shared

    def forward(self, hidden_states):
        b, shape = self.block, hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1]).float()
        as_np = lambda t: None if t is None else t.detach().float().numpy()
        logits = x.numpy() @ as_np(b.router_weight).T
        if b.router_bias is not None:
            logits = logits + as_np(b.router_bias)
        experts = [_ExpertWeights(getattr(b, p), b.spec.layer, p, self.quantizers) for p in PROJECTIONS]
        y = torch.from_numpy(moe_reference(x.numpy(), logits.astype(np.float32), *experts,
                                           *(as_np(getattr(b, f"{p}_bias")) for p in PROJECTIONS),
                                           as_np(b.score_bias), spec=b.spec))
        if self.shared is not None:
            y = y + self.shared(x)
        y = y.reshape(shape).to(hidden_states.dtype)
        return (y, None) if self.returns_router_scores else y


class _ExpertWeights:
    """One projection's stacked expert weights [E, out, in]; indexing gives expert e's in fp32,
    quantized and dequantized when `quantizers` has it, made only then."""

    def __init__(self, stacked: torch.Tensor, layer: int, proj: str, quantizers: dict):
        self.stacked, self.layer, self.proj, self.quantizers = stacked, layer, proj, quantizers
        self.shape = tuple(stacked.shape)

    def __getitem__(self, expert: int) -> np.ndarray:
        weight = self.stacked[expert].detach().float().numpy()
        quantizer = self.quantizers.get(expert_weight_name(self.layer, expert, self.proj))
        return weight if quantizer is None else quantizer(weight).dequantize()


def streamed_reference(stream, adapter, blocks, probe: np.ndarray, pasts: list[tuple[int, ...]],
                       quantizers: dict, pruning: dict) -> list[np.ndarray]:
    """Logits and every layer's KV cache of the transformers model on `probe`, as the artifact
    returns them, materializing each part (decoder layer, embeddings, head, ...) only for its own
    call. Where `quantizers` has a weight the reference computes with it quantized and
    dequantized, and a layer in `pruning` prunes dynamically as planned."""
    from moec.trace import KVCacheModel
    from moec.weights import part_of

    model = stream.model
    layers = stream.layer_paths()
    tensors = [name for name, _ in [*model.named_parameters(), *model.named_buffers()]]
    parts = sorted({part_of(name.rpartition(".")[0], layers) for name in tensors})
    streamed = _PartByPart(stream, adapter, {b.path.rpartition(".")[0]: b for b in blocks}, quantizers, pruning)
    handles = []
    try:
        for path in parts:
            handles += streamed.hook(path)
        ids = torch.from_numpy(probe)
        with torch.no_grad():
            outputs = KVCacheModel(model)(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None],
                                          *[torch.zeros(shape) for shape in pasts])
        return [t.float().numpy() for t in outputs]
    finally:
        for handle in handles:
            handle.remove()
        streamed.close()


class _PartByPart:
    """Forward hooks that materialize a part for its call, as the artifact computes it (a sparse
    block swapped for a ReferenceMoE, weights dequantized when quantized), and free it afterwards."""

    def __init__(self, stream, adapter, block_of_layer: dict, quantizers: dict, pruning: dict):
        self.stream, self.adapter, self.block_of_layer = stream, adapter, block_of_layer
        self.quantizers, self.pruning = quantizers, pruning
        self.swapped = self.current = None

    def hook(self, path: str) -> list:
        layer = self.stream.model.get_submodule(path)
        return [layer.register_forward_pre_hook(lambda *_: self.load(path)),
                layer.register_forward_hook(lambda *_: self.unload(path))]

    def load(self, path: str) -> None:
        self.stream.load(path)
        self.current = path
        block = self.block_of_layer.get(path)
        if block is not None:
            live = self.adapter.block(block.spec.layer, self.stream.model.get_submodule(block.path), block.path)
            if block.spec.layer in self.pruning:
                beta, protect_fraction = self.pruning[block.spec.layer]
                live.spec = dataclasses.replace(live.spec, beta=beta, protect_fraction=protect_fraction)
            self.swapped = swap_block(self.stream.model, live, self.adapter, self.quantizers)
        set_dequantized_weights(self.stream.model, path, self.quantizers)

    def unload(self, path: str) -> None:
        if self.swapped is not None:
            self.swapped()
            self.swapped = None
        self.stream.unload(path)
        self.current = None

    def close(self) -> None:
        """Undo what a layer whose forward raised left behind."""
        if self.current is not None:
            self.unload(self.current)


def swap_block(model, block: MoEBlock, adapter, quantizers: dict | None = None):
    """Put a ReferenceMoE of `block` in the model in place of its sparse block; returns the undo."""
    parent, _, attr = block.path.rpartition(".")
    original = model.get_submodule(block.path)
    setattr(model.get_submodule(parent), attr, ReferenceMoE(block, adapter.returns_router_scores, quantizers))
    return lambda: setattr(model.get_submodule(parent), attr, original)


def set_dequantized_weights(model, part: str, quantizers: dict) -> None:
    """Give the non-expert weights of the part at `part` the values the artifact computes with:
    each one `quantizers` has, quantized and dequantized (routed experts: see ReferenceMoE)."""
    import re

    for name, quantizer in quantizers.items():
        if name.startswith(part + ".") and not re.fullmatch(EXPERT_WEIGHT_PATTERN, name):
            weight = model.get_submodule(name.removesuffix(".weight")).weight
            weight.data.copy_(torch.from_numpy(quantizer(weight.detach().numpy()).dequantize()).reshape(weight.shape))
