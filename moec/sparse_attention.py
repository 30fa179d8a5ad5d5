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
positions from its own first visible key. MiniMax-M3's indexer sizes its pad and its top-k from the
traced key length (`if pad`, `min(top-k, blocks)`), which export would fix at the traced values; here
both hold for any length.
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


def minimax_m3_blocks(indexer, apply_rotary_pos_emb, hidden_states, position_embeddings, cache, position_ids):
    """MiniMax-M3's lightning indexer with shapes fixed for export: each query's `index_topk_blocks`
    key blocks ([B, heads, Q, top-k], -1 where a slot has no block). The family's code pads the key
    scores to whole blocks only when the keys do not fill them and takes min(top-k, blocks) blocks, both
    decided on the traced length; here the pad is computed from the length, and the scores are padded
    by top-k blocks of -inf more, so top-k never exceeds them and a padding block is never chosen."""
    batch, q_len, _ = hidden_states.shape
    size = indexer.block_size
    queries = indexer.q_norm(indexer.q_proj(hidden_states).view(batch, q_len, -1, indexer.head_dim)).transpose(1, 2)
    keys = indexer.k_norm(indexer.k_proj(hidden_states).view(batch, q_len, 1, indexer.head_dim)).transpose(1, 2)
    cos, sin = position_embeddings
    queries, keys = apply_rotary_pos_emb(queries, keys, cos[..., :indexer.head_dim], sin[..., :indexer.head_dim])
    if cache is not None:
        keys = cache.layers[indexer.layer_idx].update_index(keys)
    key_len = keys.shape[2]
    scores = torch.matmul(queries.float(), keys.float().transpose(-1, -2))
    future = torch.arange(key_len, device=scores.device)[None, None, None, :] > position_ids[:, None, :, None]
    scores = scores.masked_fill(future, float("-inf"))
    scores = torch.nn.functional.pad(scores, (0, (-key_len) % size + indexer.topk_blocks * size), value=float("-inf"))
    block_scores = scores.unflatten(-1, (-1, size)).amax(-1)  # [B, heads, Q, blocks]
    if indexer.local_blocks > 0:
        local = torch.arange(indexer.local_blocks, device=scores.device)
        local = ((position_ids // size)[..., None] - local).clamp(min=0)
        local = local.unsqueeze(1).expand(-1, indexer.num_heads, -1, -1)
        block_scores = block_scores.scatter(-1, local, float("inf"))
    top = block_scores.topk(indexer.topk_blocks, dim=-1)
    return top.indices.masked_fill(top.values == float("-inf"), -1)


def minimax_m3_mask(indexer, block_indices, attention_mask, key_length, dtype, device, position_ids):
    """MiniMax-M3's build_block_mask without per-length shapes: each key reads whether its block
    (key // block size) is among its query's chosen blocks, instead of the chosen blocks' mask repeated
    block-size times and cut to the keys."""
    heads = indexer.config.num_attention_heads // block_indices.shape[1]
    key_block = torch.arange(key_length, device=device) // indexer.block_size
    # one column per block, and one more that the -1 slots write to (blocks <= keys)
    chosen = torch.zeros((*block_indices.shape[:-1], key_length + 1), dtype=torch.bool, device=device)
    chosen = chosen.scatter(-1, block_indices.masked_fill(block_indices < 0, key_length), True)
    keep = chosen.gather(-1, key_block.expand(*block_indices.shape[:-1], key_length))
    keep = keep.repeat_interleave(heads, dim=1)
    if attention_mask is not None:
        keep = keep & (attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0)
    else:
        keep = keep & ~(torch.arange(key_length, device=device)[None, None, None, :] > position_ids[:, None, :, None])
    return torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill(~keep, torch.finfo(dtype).min)


@contextlib.contextmanager
def exportable_minimax_m3_selection(module_name: str, indexer_class: str):
    """While exporting, MiniMax-M3's indexer picks its blocks by minimax_m3_blocks and masks the keys
    by minimax_m3_mask."""
    modeling = importlib.import_module(module_name)
    indexer = getattr(modeling, indexer_class)

    def forward(self, hidden_states, position_embeddings, cache, position_ids):
        return minimax_m3_blocks(self, modeling.apply_rotary_pos_emb, hidden_states, position_embeddings, cache,
                                 position_ids)

    with mock.patch.object(indexer, "forward", forward), \
            mock.patch.object(indexer, "build_block_mask", minimax_m3_mask):
        yield
