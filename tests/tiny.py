"""Tiny random models of every supported family, saved locally (no hub), with a byte tokenizer.

Weights are drawn wider than transformers' default init (std 0.02) so that routing decisions
are clear-cut rather than near-ties, which would make any comparison flaky.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 256
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, initializer_range=0.08, tie_word_embeddings=False,
              bos_token_id=None, eos_token_id=None, pad_token_id=None)


def configs() -> dict:
    import transformers as t

    return {
        "mixtral": t.MixtralConfig(**COMMON, intermediate_size=96, num_hidden_layers=2,
                                   num_local_experts=4, num_experts_per_tok=2),
        "qwen2_moe": t.Qwen2MoeConfig(**COMMON, intermediate_size=96, moe_intermediate_size=48,
                                      shared_expert_intermediate_size=80, num_hidden_layers=3,
                                      num_experts=6, num_experts_per_tok=2, norm_topk_prob=False,
                                      decoder_sparse_step=1, mlp_only_layers=[1]),
        "qwen3_moe": t.Qwen3MoeConfig(**COMMON, head_dim=16, intermediate_size=96, moe_intermediate_size=48,
                                      num_hidden_layers=2, num_experts=8, num_experts_per_tok=3,
                                      norm_topk_prob=True),
        "olmoe": t.OlmoeConfig(**COMMON, intermediate_size=48, num_hidden_layers=2, num_experts=8,
                               num_experts_per_tok=2, norm_topk_prob=False),
        "deepseek_v3": t.DeepseekV3Config(**{**COMMON, "num_key_value_heads": 4}, intermediate_size=96,
                                          moe_intermediate_size=32, num_hidden_layers=3,
                                          first_k_dense_replace=1, n_routed_experts=8, n_group=4,
                                          topk_group=2, num_experts_per_tok=2, n_shared_experts=1,
                                          q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
                                          qk_nope_head_dim=8, v_head_dim=16, routed_scaling_factor=2.5,
                                          norm_topk_prob=True),
        "phimoe": t.PhimoeConfig(**COMMON, intermediate_size=64, num_hidden_layers=2, num_local_experts=4,
                                 num_experts_per_tok=2, router_jitter_noise=0.01),
        "granitemoe": t.GraniteMoeConfig(**COMMON, intermediate_size=48, num_hidden_layers=2,
                                         num_local_experts=4, num_experts_per_tok=2,
                                         embedding_multiplier=2.0, logits_scaling=1.5,
                                         residual_multiplier=0.7, attention_multiplier=0.2),
        "gpt_oss": t.GptOssConfig(**COMMON, head_dim=16, intermediate_size=48, num_hidden_layers=2,
                                  num_local_experts=4, num_experts_per_tok=2, sliding_window=16),
    }


ARCHITECTURES = tuple(configs())


def byte_tokenizer():
    """A byte-level BPE tokenizer with exactly 256 tokens (one per byte, no merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet(), key=lambda ch: ch.encode("utf-8"))
    tokenizer = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def save_tiny(arch: str, folder: Path, seed: int = 0):
    """Build the family's tiny random model, save it (safetensors) with a tokenizer; return it."""
    import transformers

    transformers.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    config = configs()[arch]
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # zero at init; make the bias matter
                buffer.copy_(torch.randn_like(buffer) * 0.1)
    model.save_pretrained(folder)
    byte_tokenizer().save(str(Path(folder) / "tokenizer.json"))
    (Path(folder) / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    return model
