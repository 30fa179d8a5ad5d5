"""DeepSeek-V4's compressed attention written without shape-dependent branches, for export: the same
computation as the family's compressors and indexer, for any number of new tokens and any state its
cache layers hold.

A compressed-attention cache layer keeps, per compressor (its "compressor", and the lightning
indexer's own "indexer"), the tokens since the last full window (`buffer_kv`, `buffer_gate`), the
compressed entries so far (`compressed_kv`) and their count (`entry_count`), and where windows
overlap (compressed sparse attention) the last window's first series (`overlap_kv`, `overlap_gate`).
The family's code branches on whether a call closes a window, whether the buffer is empty, whether an
overlap was saved, whether the call is a single token, and takes min(top-k, entries) of the
indexer's scores: export would fix each at the traced sizes. Here a call that closes no window
computes on zero windows, buffers and entries are concatenated whatever their length, the overlap
a sequence starts with (zeros) is read at weight 0 (a gate of -inf, as the family's code starts it)
until the first entry exists, and the indexer's scores are padded by top-k columns of -inf.
"""

from __future__ import annotations

import contextlib
import importlib
from unittest import mock

import torch

NEGATIVE_INFINITY = float("-inf")


def compress(compressor, apply_rotary_pos_emb, layer, name: str, hidden_states, overlapping: bool):
    """The compressor's entries so far [B, T, D] once this call's tokens are in, its cache layer's
    state `name` updated: one entry per closed window of `compress_rate` tokens, the window's tokens
    (and, overlapping, the previous window's first series) pooled by a softmax over their gates."""
    kv, gate = compressor.kv_proj(hidden_states), compressor.gate_proj(hidden_states)
    batch, ratio, width = kv.shape[0], compressor.compress_rate, kv.shape[-1]
    first_position = layer.entry_count[name] * ratio
    kv = torch.cat([_held(layer.buffer_kv, name, kv.new_zeros(batch, 0, width)), kv], 1)
    gate = torch.cat([_held(layer.buffer_gate, name, gate.new_zeros(batch, 0, width)), gate], 1)
    windows = kv.shape[1] // ratio
    layer.buffer_kv[name], layer.buffer_gate[name] = kv[:, windows * ratio:], gate[:, windows * ratio:]
    chunk_kv = kv[:, :windows * ratio].reshape(batch, windows, ratio, width)
    chunk_gate = gate[:, :windows * ratio].reshape(batch, windows, ratio, width) + compressor.position_bias
    if overlapping:  # window w pools window w - 1's first series (Ca) with its own second (Cb)
        size = width // 2
        overlap_kv = _held(layer.overlap_kv, name, kv.new_zeros(batch, ratio, size))
        overlap_gate = _held(layer.overlap_gate, name, gate.new_zeros(batch, ratio, size))
        started = torch.full((), layer.entry_count[name], device=kv.device) > 0
        prior_gate = torch.where(started, overlap_gate, NEGATIVE_INFINITY)
        previous_kv = torch.cat([overlap_kv[:, None], chunk_kv[..., :size]], 1)
        previous_gate = torch.cat([overlap_gate[:, None], chunk_gate[..., :size]], 1)
        layer.overlap_kv[name], layer.overlap_gate[name] = previous_kv[:, -1], previous_gate[:, -1]
        previous_gate = torch.cat([prior_gate[:, None], previous_gate[:, 1:]], 1)
        chunk_kv = torch.cat([previous_kv[:, :-1], chunk_kv[..., size:]], 2)
        chunk_gate = torch.cat([previous_gate[:, :-1], chunk_gate[..., size:]], 2)
    weights = chunk_gate.softmax(dim=2, dtype=torch.float32).to(chunk_kv.dtype)
    compressed = compressor.kv_norm((chunk_kv * weights).sum(dim=2))
    # rotated with one more (zero) entry: the family's rotary reshapes to an inferred axis, which onnxruntime
    # cannot infer from zero entries
    compressed = torch.cat([compressed, compressed.new_zeros(batch, 1, compressed.shape[-1])], 1)
    positions = (torch.arange(windows + 1, device=kv.device) * ratio + first_position).unsqueeze(0).expand(batch, -1)
    cos, sin = compressor.rotary_emb(compressed, position_ids=positions, layer_type=compressor.rope_layer_type)
    compressed = apply_rotary_pos_emb(compressed.unsqueeze(1), cos, sin).squeeze(1)[:, :windows]
    entries = _held(layer.compressed_kv, name, compressed.new_zeros(batch, 0, compressed.shape[-1]))
    layer.compressed_kv[name] = torch.cat([entries, compressed], 1)
    layer.entry_count[name] = layer.entry_count[name] + windows
    return layer.compressed_kv[name]


def _held(states: dict, name: str, empty: torch.Tensor) -> torch.Tensor:
    """A state the layer holds, or what it holds at the start of a sequence (the family's code keeps
    None there)."""
    return empty if states[name] is None else states[name]


def _causal_threshold(module, position_ids):
    """[B, S, 1]: the entries a query may read are those below it (an entry pools tokens up to
    (entry + 1) * rate - 1)."""
    return ((position_ids + 1) // module.compress_rate).unsqueeze(-1)


@contextlib.contextmanager
def exportable_compressed_attention(module_name: str, prefix: str):
    """While exporting, the family's heavily compressed attention, compressed sparse attention and
    its indexer (`{prefix}HCACompressor`, `{prefix}CSACompressor`, `{prefix}Indexer`) compute as the
    functions above."""
    modeling = importlib.import_module(module_name)
    rotate = modeling.apply_rotary_pos_emb

    def heavily_compressed(self, hidden_states, q_residual, position_ids, cache, layer_idx):
        entries = compress(self, rotate, cache.layers[layer_idx], "compressor", hidden_states, False).unsqueeze(1)
        visible = torch.arange(entries.shape[2], device=entries.device) < _causal_threshold(self, position_ids)
        # a single token (a decode step) reads every entry, as the family's code has it
        single = torch.ones_like(position_ids).sum(-1)[:, None, None] == 1
        bias = torch.zeros(visible.shape, dtype=entries.dtype, device=entries.device)
        return entries, bias.masked_fill(~(visible | single), NEGATIVE_INFINITY).unsqueeze(1)

    def indexer(self, hidden_states, q_residual, position_ids, cache, layer_idx):
        batch, seq_len, _ = hidden_states.shape
        entries = compress(self, rotate, cache.layers[layer_idx], "indexer", hidden_states, True)
        cos, sin = self.rotary_emb(hidden_states, position_ids=position_ids, layer_type=self.rope_layer_type)
        q = self.q_b_proj(q_residual).view(batch, seq_len, -1, self.head_dim).transpose(1, 2)
        q = rotate(q, cos, sin).transpose(1, 2)
        scores = self.scorer(q, entries, hidden_states)  # [B, S, T]
        threshold = _causal_threshold(self, position_ids)
        scores = scores.masked_fill(torch.arange(entries.shape[1], device=scores.device) >= threshold,
                                    NEGATIVE_INFINITY)
        top = torch.nn.functional.pad(scores, (0, self.index_topk), value=NEGATIVE_INFINITY)
        top = top.topk(self.index_topk, dim=-1).indices
        return torch.where(top >= threshold, -1, top)

    def compressed_sparse(self, hidden_states, q_residual, position_ids, cache, layer_idx):
        batch, seq_len, _ = hidden_states.shape
        entries = compress(self, rotate, cache.layers[layer_idx], "compressor", hidden_states, True).unsqueeze(1)
        chosen = self.indexer(hidden_states, q_residual, position_ids, cache, layer_idx)  # [B, S, k], -1: none
        count = entries.shape[2]
        bias = entries.new_full((batch, 1, seq_len, count + 1), NEGATIVE_INFINITY)
        bias = bias.scatter(-1, torch.where(chosen >= 0, chosen, count).unsqueeze(1), 0.0)
        return entries, bias[..., :count]

    with mock.patch.object(getattr(modeling, f"{prefix}HCACompressor"), "forward", heavily_compressed), \
            mock.patch.object(getattr(modeling, f"{prefix}CSACompressor"), "forward", compressed_sparse), \
            mock.patch.object(getattr(modeling, f"{prefix}Indexer"), "forward", indexer):
        yield
