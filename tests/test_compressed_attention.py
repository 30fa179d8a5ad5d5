"""DeepSeek-V4's compressed attention as moec traces it: its cache layers carried as past inputs
(moec.trace.KVCacheModel) and its compressors without shape-dependent branches
(moec/compressed_attention.py), run eagerly against the family's own code and cache, over prefills
and decode steps that close windows and ones that do not, on a left-padded batch."""

from __future__ import annotations

import numpy as np
import torch

import tiny
from moec.trace import EXPORT_REWRITES, KVCacheModel, cache_inputs

# new tokens per call: windows of 4 (compressed sparse) and 8 (heavily compressed) close inside
# prefills, at single decode steps and not at all; the sliding window (16) fills midway
CALLS = [7, 1, 1, 9, 1, 3, 1, 1, 6, 1, 1, 1, 2, 1, 1]


def _compressor_states(cache) -> dict[str, torch.Tensor]:
    """Every tensor the cache's layers keep in dicts, by the past input moec carries it in."""
    return {f"past_key_values.{i}.{key}_{attribute}": held[key].clone() for i, layer in enumerate(cache.layers)
            for attribute, held in vars(layer).items() if isinstance(held, dict)
            for key in held if isinstance(held[key], torch.Tensor)}


def test_the_compressed_cache_carried_as_pasts_computes_as_the_family_code(tmp_path):
    model = tiny.save_tiny("deepseek_v4", tmp_path)
    batch, total = 2, sum(CALLS)
    ids = torch.randint(0, model.config.vocab_size, (batch, total), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(batch, total, dtype=torch.int64)
    mask[1, :5] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    steps = [slice(end - count, end) for count, end in zip(CALLS, np.cumsum(CALLS).tolist())]
    expected, cache = [], None  # the family's own code and cache, before the rewrite is in force
    with torch.no_grad():
        for step in steps:
            out = model(input_ids=ids[:, step], attention_mask=mask[:, :step.stop], position_ids=positions[:, step],
                        cache=cache, use_cache=True)
            cache = out.cache
            expected.append((out.logits, _compressor_states(cache)))
    with EXPORT_REWRITES["deepseek_v4"](), torch.no_grad():
        layout = cache_inputs(model, batch, past=5)
        names = list(layout.shapes)
        # the shared-KV layers carry their keys once; each compressor's state under its own name
        assert "past_key_values.0.key" in names and "past_key_values.0.value" not in names
        assert {"past_key_values.0.indexer_compressed_kv", "past_key_values.0.compressor_overlap_gate",
                "past_key_values.1.compressor_buffer_kv"} <= set(names)
        assert layout.own_layers[0][("entry_count", "indexer")] == ("indexer_compressed_kv", 1)
        traced = KVCacheModel(model, names, layout.cache_class, layout.own_layers)
        past = [torch.zeros([0 if axis == layout.sequence_axes.get(name) else size
                             for axis, size in enumerate(shape)]) for name, shape in layout.shapes.items()]
        entries = []
        for step, (logits, states) in zip(steps, expected):
            got, *past = traced(ids[:, step], mask[:, :step.stop], positions[:, step], *past)
            np.testing.assert_allclose(got.numpy(), logits.numpy(), atol=1e-5, rtol=0)
            carried = dict(zip(names, past))
            assert set(states) <= set(carried)
            for name, state in states.items():
                np.testing.assert_allclose(carried[name].numpy(), state.numpy(), atol=1e-5, rtol=0, err_msg=name)
            entries.append(carried["past_key_values.1.compressor_compressed_kv"].shape[1])
    grew = np.diff([0, *entries]) > 0
    assert grew.any() and not grew.all() and entries[-1] == total // 8
