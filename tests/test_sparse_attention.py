"""The exportable form of a sparse-attention indexer selects the same keys as transformers' own."""

import importlib

import pytest
import torch

import tiny


@pytest.mark.xdist_group("qwen4_exp_text")
def test_qwen4_exp_block_selection_equals_transformers_loop(tmp_path):
    """Qwen4-Exp's indexer (a loop over queries with nonzero) against moec.sparse_attention's
    whole-batch form, on a left-padded batch of 21 tokens: long enough that every query past the
    first 10 keys drops some of its blocks, in prefill and in a cached decode step."""
    from moec.sparse_attention import select_blocks

    model = tiny.save_tiny("qwen4_exp_text", tmp_path / "model")
    modeling = importlib.import_module(type(model).__module__)
    indexer = modeling.Qwen4ExpTextQSAIndexer
    original = indexer._select_tokens
    masks = []

    def both(self, hidden_states, q, raw_keys, full_cos, full_sin, attention_mask, **kwargs):
        want = original(self, hidden_states, q, raw_keys, full_cos, full_sin, attention_mask, **kwargs)
        got = select_blocks(self, modeling.apply_rotary_pos_emb, q, raw_keys, full_cos, full_sin, attention_mask)
        visible = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        masks.append((want, got, visible))
        return want

    ids = torch.randint(0, model.config.vocab_size, (2, 21), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 21, dtype=torch.int64)
    mask[1, :5] = 0
    indexer._select_tokens = both
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, use_cache=True)
            model(input_ids=ids[:, :1], attention_mask=torch.cat([mask, mask[:, :1]], 1), cache=out.cache)
    finally:
        indexer._select_tokens = original
    assert [want.shape[2] for want, _, _ in masks] == [21, 1]
    for want, got, visible in masks:
        assert got.dtype == torch.bool and torch.equal(got, want)
        assert (want != visible).any()  # the selection dropped keys: the comparison covers it


@pytest.mark.xdist_group("kolibri1_1")
def test_kolibri_pool_and_key_selection_equal_transformers_loop(tmp_path):
    """Kolibri 1.1's indexer (a loop over each batch row's groups of queries, found with unique)
    against moec.sparse_attention's whole-batch forms, with its NVFP4 rounding as moec exports it,
    on a left-padded batch of 30 tokens (past the tiny config's pool of 8 and budget of 9), in
    prefill and in a cached decode step."""
    from moec.sparse_attention import kolibri_pool, kolibri_tokens, nvfp4_fake_quantize

    model = tiny.save_tiny("kolibri1_1", tmp_path / "model")
    modeling = importlib.import_module(type(model).__module__)
    indexer = modeling.Kolibri1_1Indexer
    pool, tokens = indexer.select_pool, indexer.select_tokens
    selections = []

    def both_pool(self, queries, keys, visible):
        want = pool(self, queries, keys, visible)
        selections.append((want, kolibri_pool(self, queries, keys, visible), visible))
        return want

    def both_tokens(self, queries, keys, visible, index_pool):
        want = tokens(self, queries, keys, visible, index_pool)
        got = kolibri_tokens(self, queries, keys, visible, index_pool)
        selections.append((want, got, visible))
        return want

    x = torch.randn(2, 3, 40, 32, generator=torch.Generator().manual_seed(0)) * 3
    assert torch.equal(nvfp4_fake_quantize(x), modeling.nvfp4_fake_quantize(x))
    ids = torch.randint(0, model.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 30, dtype=torch.int64)
    mask[1, :7] = 0
    indexer.select_pool, indexer.select_tokens = both_pool, both_tokens
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, use_cache=True)
            model(input_ids=ids[:, :1], attention_mask=torch.cat([mask, mask[:, :1]], 1), cache=out.cache)
    finally:
        indexer.select_pool, indexer.select_tokens = pool, tokens
    assert [want.shape[1] for want, _, _ in selections] == [30, 30, 1, 1]
    for want, got, visible in selections:
        assert got.dtype == torch.bool and torch.equal(got, want)
        assert (want != visible).any()  # the selection dropped keys: the comparison covers it


@pytest.mark.xdist_group("minimax_m3_vl_text")
def test_minimax_m3_block_mask_equals_transformers(tmp_path):
    """MiniMax-M3's indexer and block mask (pad and top-k sized on the traced length) against
    moec.sparse_attention's fixed-shape forms, on a left-padded batch of 21 tokens (six blocks of 4,
    two chosen and one local a query), in prefill and in a cached decode step."""
    from types import SimpleNamespace

    from moec.sparse_attention import minimax_m3_blocks, minimax_m3_mask

    model = tiny.save_tiny("minimax_m3_vl_text", tmp_path / "model")
    modeling = importlib.import_module(type(model).__module__)
    indexer = modeling.MiniMaxM3VLIndexer
    forward, build = indexer.forward, indexer.build_block_mask
    chosen, masks = [], []

    def both_forward(self, hidden_states, position_embeddings, cache, position_ids):
        want = forward(self, hidden_states, position_embeddings, cache, position_ids)  # fills the cache
        seen = SimpleNamespace(layers={self.layer_idx: SimpleNamespace(
            update_index=lambda keys: cache.layers[self.layer_idx].idx_keys)})
        chosen.append(minimax_m3_blocks(self, modeling.apply_rotary_pos_emb, hidden_states, position_embeddings,
                                        seen, position_ids))
        return want

    def both_masks(self, block_indices, attention_mask, key_length, dtype, device, position_ids):
        want = build(self, block_indices, attention_mask, key_length, dtype, device, position_ids)
        masks.append((want, minimax_m3_mask(self, chosen[-1], attention_mask, key_length, dtype, device,
                                            position_ids), attention_mask))
        return want

    ids = torch.randint(0, model.config.vocab_size, (2, 21), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 21, dtype=torch.int64)
    mask[1, :5] = 0
    indexer.forward, indexer.build_block_mask = both_forward, both_masks
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, use_cache=True)
            model(input_ids=ids[:, :1], attention_mask=torch.cat([mask, mask[:, :1]], 1), cache=out.cache)
    finally:
        indexer.forward, indexer.build_block_mask = forward, build
    assert [want.shape[2] for want, _, _ in masks] == [21, 1]
    for want, got, visible in masks:
        assert torch.equal(got, want)
        allowed = visible if visible.dtype == torch.bool else visible == 0
        assert ((want == 0) != allowed).any()  # the selection dropped keys: the comparison covers it
