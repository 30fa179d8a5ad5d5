"""Sparse-attention indexers written without data-dependent shapes, for export: the same selection
of keys as the family's own code, for all queries at once.

Qwen4-Exp's QSA indexer picks, for each query, the key blocks its indexer heads score highest: it
walks queries one by one, compacts each one's visible keys with `nonzero` and pools them in blocks of
`compress_ratio`. torch.onnx cannot export that loop (`nonzero` has no shape on the meta device). The
same selection for all queries at once: a visible key's place among its query's visible keys is a
cumulative sum, the compacted key list a scatter by that place, the chosen blocks a fixed-size top-k
over scores padded with -inf. Blocks of exactly equal score are chosen lowest first (onnxruntime's
TopK), where torch's topk leaves the order open. Kolibri 1.1's indexer groups each batch row's queries
by their first visible key with `unique().tolist()`; here every query counts its blocks and local
positions from its own first visible key.
"""

from __future__ import annotations

import contextlib
import importlib
import math
from unittest import mock

import torch


def select_blocks(indexer, apply_rotary_pos_emb, q, raw_keys, full_cos, full_sin, attention_mask):
    """The indexer's selection mask [B, 1, Q, K]: each query's visible keys in its `block_topk`
    best-scoring complete blocks, plus the visible keys after its last complete block."""
    visible = (attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0)[:, 0]  # [B, Q, K]
    ratio, keys = indexer.compress_ratio, visible.shape[-1]
    blocks = keys // ratio
    counted = visible.sum(-1, keepdim=True)
    rank = visible.long().cumsum(-1) - 1  # a visible key's place among its query's visible keys
    places = torch.arange(keys, device=visible.device)
    # the visible keys of each query, in order (the rest of the row reads key 0 and is masked below)
    compact = torch.zeros_like(rank).scatter(-1, torch.where(visible, rank, keys - 1).clamp(min=0),
                                             places.expand_as(rank))
    compact = torch.where(places < counted, compact, 0)
    members = compact[..., :blocks * ratio].unflatten(-1, (blocks, ratio))  # [B, Q, blocks, ratio]
    batch = torch.arange(visible.shape[0], device=visible.device)[:, None, None]
    pooled = indexer.k_layernorm(raw_keys[batch[..., None], members].float().mean(-2).to(raw_keys.dtype))
    starts = members[..., 0]
    block_keys = apply_rotary_pos_emb(pooled.unsqueeze(-2), cos=full_cos[batch, starts], sin=full_sin[batch, starts],
                                      unsqueeze_dim=-2).squeeze(-2)
    scores = torch.einsum("bqhd,bqjd->bqjh", q.float(), block_keys.float()).relu().sum(-1)
    scores = scores / math.sqrt(indexer.index_head_dim)
    complete = counted // ratio
    scores = scores.masked_fill(torch.arange(blocks, device=visible.device) >= complete, float("-inf"))
    scores = torch.nn.functional.pad(scores, (0, indexer.block_topk), value=float("-inf"))  # k never exceeds them
    top = scores.topk(indexer.block_topk, dim=-1)
    chosen = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, top.indices, top.values > float("-inf"))
    block = (rank // ratio).clamp(min=0, max=scores.shape[-1] - 1)
    return (visible & ((rank // ratio >= complete) | chosen.gather(-1, block))).unsqueeze(1)


@contextlib.contextmanager
def exportable_block_selection(module_name: str, indexer_class: str):
    """While exporting, the family's indexer selects its key blocks by select_blocks."""
    modeling = importlib.import_module(module_name)
    indexer = getattr(modeling, indexer_class)

    def _select_tokens(self, hidden_states, q, raw_keys, full_cos, full_sin, attention_mask, **kwargs):
        return select_blocks(self, modeling.apply_rotary_pos_emb, q, raw_keys, full_cos, full_sin, attention_mask)

    with mock.patch.object(indexer, "_select_tokens", _select_tokens):
        yield


def _scores(indexer, routing_queries, routing_keys):
    """indexer.score for every query of a batch at once: [B, heads, Q, D] queries against [B, Q, N, D]
    keys (or [B, N, D], the same for all queries), summed head by head in the family's order."""
    shared = routing_keys.dim() == 3
    scores = 0
    for head in range(routing_queries.shape[1]):
        q = routing_queries[:, head]
        logits = q @ routing_keys.transpose(-1, -2) if shared else torch.einsum("bqd,bqnd->bqn", q, routing_keys)
        scores = scores + logits.relu()
    return scores * indexer.head_weight


def _top(indexer, scores, k):
    """indexer.top_k_mask over at least k columns (padding scores with -inf keeps none of the padding)."""
    padded = torch.nn.functional.pad(scores, (0, k), value=float("-inf"))
    return indexer.top_k_mask(padded, k)[..., :scores.shape[-1]]


def kolibri_pool(indexer, queries, keys, visible):
    """Kolibri 1.1's select_pool for all queries at once: a query that sees more than `pool_size`
    keys (from its first visible one) keeps the blocks of `compression` keys, counted from that
    first key, whose NVFP4 summaries it scores highest; its newest, incomplete block competes at
    score 0."""
    ratio, keys_count = indexer.compression, visible.shape[-1]
    starts = visible.int().argmax(-1)  # [B, Q]
    lengths = (keys_count - visible.flip(-1).int().argmax(-1) - starts) * visible.any(-1)
    blocks = keys_count // ratio + 1
    document_keys = keys[:, 0].masked_fill(~visible.any(1)[..., None], 0.0)  # keys no query sees count as zeros
    member = starts[..., None, None] + torch.arange(blocks * ratio, device=keys.device).view(blocks, ratio)
    batch = torch.arange(visible.shape[0], device=keys.device)[:, None, None, None]
    members = document_keys[batch, member.clamp(max=keys_count - 1)].float()  # [B, Q, blocks, ratio, D]
    members = members.masked_fill((member >= keys_count)[..., None], 0.0)
    summaries = nvfp4_fake_quantize(members.sum(-2) / ratio)
    scores = _scores(indexer, nvfp4_fake_quantize(queries[:, :indexer.num_heads]).float(), summaries)
    block = torch.arange(blocks, device=keys.device)
    scores = torch.where(block < (lengths // ratio)[..., None], scores, 0.0)
    scores = scores.masked_fill(block >= ((lengths + ratio - 1) // ratio)[..., None], float("-inf"))
    chosen = _top(indexer, scores, indexer.pool_size // ratio)
    offset = torch.arange(keys_count, device=keys.device) - starts[..., None]  # from the first visible key
    kept = chosen.gather(-1, (offset // ratio).clamp(min=0, max=blocks - 1)) & (offset >= 0)
    long = (lengths > indexer.pool_size)[..., None]
    return visible & (kept | ~long)  # not torch.where: onnxruntime's CPU Where has no bool kernel


def kolibri_tokens(indexer, queries, keys, visible, pool):
    """Kolibri 1.1's select_tokens for all queries at once: a query that sees more than its budget
    attends to its `topk` best-scoring pool keys, its first `num_sink_tokens` and its last
    `num_local_tokens` visible positions (counted from its first visible key)."""
    keys_count = visible.shape[-1]
    starts = visible.int().argmax(-1)
    lengths = ((keys_count - visible.flip(-1).int().argmax(-1) - starts) * visible.any(-1))[..., None]
    offset = torch.arange(keys_count, device=keys.device) - starts[..., None]
    scores = _scores(indexer, nvfp4_fake_quantize(queries[:, :indexer.num_heads]).float(),
                     nvfp4_fake_quantize(keys[:, 0]).float())
    sinks = (offset >= 0) & (offset < indexer.num_sink_tokens)
    local = (offset >= lengths - indexer.num_local_tokens) & (offset < lengths)
    candidates = pool & ~sinks & (offset >= 0) & (offset < lengths - indexer.num_local_tokens)
    chosen = _top(indexer, scores.masked_fill(~candidates, float("-inf")), indexer.topk)
    budget = indexer.topk + indexer.num_local_tokens + indexer.num_sink_tokens
    return visible & (chosen | sinks | local | (lengths <= budget))


def nvfp4_fake_quantize(hidden_states: torch.Tensor) -> torch.Tensor:
    """Kolibri 1.1's nvfp4_fake_quantize (E2M1 values, one E4M3 scale per 16 values of the last axis)
    in ops torch.onnx translates: its scale's bounds both float (its type promotion finds no clamp for
    a float minimum with an integer maximum), the sign put back by a select rather than copysign
    (prims.signbit has no translation; only the sign of a zero differs)."""
    blocks = hidden_states.float().unflatten(-1, (-1, 16))
    scale = (blocks.abs().amax(-1, keepdim=True) / 6).clamp(2.0**-9, 448.0).to(torch.float8_e4m3fn).float()
    scaled = blocks / scale
    magnitude = scaled.abs().clamp(max=6.0)
    step = torch.where(magnitude < 2, 0.5, torch.where(magnitude < 4, 1.0, 2.0))
    rounded = torch.round(magnitude / step) * step
    return (torch.where(scaled < 0, -rounded, rounded) * scale).flatten(-2).to(hidden_states.dtype)


@contextlib.contextmanager
def exportable_kolibri_selection(module_name: str, indexer_class: str):
    """While exporting, Kolibri 1.1's indexer (a loop over each batch row's groups of queries, found
    with `unique`) selects its pool and keys by kolibri_pool and kolibri_tokens."""
    modeling = importlib.import_module(module_name)
    indexer = getattr(modeling, indexer_class)

    # its attention rounds keys and values with nvfp4_fake_quantize too
    with mock.patch.object(indexer, "select_pool", kolibri_pool), \
            mock.patch.object(indexer, "select_tokens", kolibri_tokens), \
            mock.patch.object(modeling, "nvfp4_fake_quantize", nvfp4_fake_quantize):
        yield
