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

    t.logging.set_verbosity_error()  # some families' configs warn about their own defaults

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
        **{arch: config for arch, config in _more_configs().items() if config is not None},
    }


def _cfg(model_type: str, **kwargs):
    """Config of `model_type` from COMMON overridden by `kwargs`; None where the installed
    transformers has no such type (one older than the type)."""
    from transformers import CONFIG_MAPPING

    return CONFIG_MAPPING[model_type](**{**COMMON, **kwargs}) if model_type in CONFIG_MAPPING else None


# Multi-head latent attention (DeepSeek-style) sizes shared by the MLA families.
MLA = dict(num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
           v_head_dim=16)
# The sparse-attention indexers (DeepSeek-V3.2's lightning indexer and its kin) keep index_topk of the
# past tokens, below the tests' lengths so the selection matters; with 8 index heads the scores
# (sums of per-head ReLUs) have no ties at the top-k boundary, which torch and onnxruntime would
# break differently (with 2 heads a third of the boundaries tie at exactly 0).
# Gated-DeltaNet (Qwen3-Next-style) linear attention sizes.
GDN = dict(linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
           linear_num_value_heads=4)


def _more_configs() -> dict:
    """Tiny configs of the other families whose experts use `use_experts_implementation`."""
    out = {}
    c = _cfg
    out["glm4_moe"] = c("glm4_moe", head_dim=16, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
                        first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                        n_group=1, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True, use_qk_norm=True)
    out["ernie4_5_moe"] = c("ernie4_5_moe", intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                            moe_num_experts=8, moe_k=2, moe_num_shared_experts=1, moe_layer_start_index=1,
                            moe_layer_end_index=2, moe_layer_interval=1)
    out["minimax_m2"] = c("minimax_m2", head_dim=16, intermediate_size=32, num_hidden_layers=2, num_local_experts=8,
                          num_experts_per_tok=2)
    out["hunyuan_v1_moe"] = c("hunyuan_v1_moe", head_dim=16, intermediate_size=48, num_hidden_layers=2, num_experts=8,
                              moe_topk=2, eod_token_id=None, sep_token_id=None)
    out["deepseek_v2"] = c("deepseek_v2", **MLA, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                           first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                           topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=1.5)
    out["qwen3_next"] = c("qwen3_next", **GDN, head_dim=16, intermediate_size=96, moe_intermediate_size=32,
                          shared_expert_intermediate_size=48, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2,
                          layer_types=["linear_attention", "full_attention"], decoder_sparse_step=1)
    out["afmoe"] = c("afmoe", head_dim=16, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                     num_dense_layers=1, num_experts=8, num_experts_per_tok=2, num_shared_experts=1,
                     global_attn_every_n_layers=2, sliding_window=16, route_scale=1.5,
                     layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    out["aria_text"] = c("aria_text", head_dim=16, intermediate_size=32, num_hidden_layers=2, moe_num_experts=8,
                         moe_topk=2, moe_num_shared_experts=1)
    out["axk1"] = c("axk1", **MLA, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
                    n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2, n_shared_experts=1,
                    mlp_layer_types=["dense", "sparse"])
    out["cohere2_moe"] = c("cohere2_moe", head_dim=16, intermediate_size=32, num_hidden_layers=2, num_experts=8,
                           num_experts_per_tok=2, num_shared_experts=1, sliding_window=16,
                           layer_types=["sliding_attention", "full_attention"], mlp_layer_types=["sparse", "sparse"])
    out["deepseek_v32"] = c("deepseek_v32", **MLA, intermediate_size=96, moe_intermediate_size=32,
                            num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=8, n_group=4, topk_group=2,
                            num_experts_per_tok=2, n_shared_experts=1, index_topk=4, index_head_dim=16,
                            index_n_heads=8, mlp_layer_types=["dense", "sparse", "sparse"],
                            layer_types=["indexed_attention"] * 3)
    out["dots1"] = c("dots1", intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                     first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                     norm_topk_prob=True, routed_scaling_factor=1.5, sliding_window=16, max_window_layers=3)
    out["exaone_moe"] = c("exaone_moe", intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                          first_k_dense_replace=1, num_experts=8, num_experts_per_tok=2, num_shared_experts=1,
                          sliding_window=16, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                          mlp_layer_types=["dense", "sparse", "sparse"])
    out["flex_olmo"] = c("flex_olmo", intermediate_size=48, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2)
    out["flint"] = c("flint", head_dim=16, intermediate_size=96, moe_intermediate_size=32,
                     shared_expert_intermediate_size=48, num_hidden_layers=3, num_experts=8, num_experts_per_tok=2,
                     mlp_only_layers=[0], decoder_sparse_step=1, sliding_window=16,
                     layer_types=["full_attention", "sliding_attention", "full_attention"])
    out["glm4_moe_lite"] = c("glm4_moe_lite", **MLA, intermediate_size=96, moe_intermediate_size=32,
                             num_hidden_layers=2, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                             n_group=1, topk_group=1, mlp_layer_types=["dense", "sparse"])
    out["glm_moe_dsa"] = c("glm_moe_dsa", **MLA, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                           first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                           index_topk=4, index_head_dim=16, index_n_heads=8,
                           mlp_layer_types=["dense", "sparse", "sparse"], layer_types=["indexed_attention"] * 3,
                           indexer_types=["full"] * 3)
    out["granitemoe_swa"] = c("granitemoe_swa", intermediate_size=48, num_hidden_layers=2, num_local_experts=4,
                              num_experts_per_tok=2, sliding_window=16,
                              layer_types=["full_attention", "sliding_attention"],
                              layer_rope_theta=[10000.0, 10000.0], embedding_multiplier=2.0, logits_scaling=1.5,
                              residual_multiplier=0.7, attention_multiplier=0.2)
    out["granitemoeshared"] = c("granitemoeshared", intermediate_size=48, shared_intermediate_size=64,
                                num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
                                embedding_multiplier=2.0, logits_scaling=1.5, residual_multiplier=0.7,
                                attention_multiplier=0.2)
    out["granitemoehybrid"] = c("granitemoehybrid", intermediate_size=48, shared_intermediate_size=64,
                                num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
                                layer_types=["linear_attention", "full_attention"],
                                mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16, mamba_n_groups=1,
                                mamba_chunk_size=16, position_embedding_type="rope", embedding_multiplier=2.0,
                                logits_scaling=1.5, residual_multiplier=0.7, attention_multiplier=0.2)
    out["hy_v3"] = c("hy_v3", head_dim=16, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                     num_experts=8, num_experts_per_tok=2, num_shared_experts=1,
                     mlp_layer_types=["dense", "sparse", "sparse"])
    out["jamba"] = c("jamba", intermediate_size=48, num_hidden_layers=2, num_experts=4, num_experts_per_tok=2,
                     attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                     mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=8, use_mamba_kernels=False)
    out["kimi_linear"] = c("kimi_linear", **{k: v for k, v in MLA.items() if k != "q_lora_rank"}, q_lora_rank=None,
                           intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3, num_experts=8,
                           num_experts_per_token=2, num_shared_experts=1, num_expert_group=1, topk_group=1,
                           linear_head_dim=16, linear_num_heads=4, linear_conv_kernel_dim=4,
                           layer_types=["linear_attention", "full_attention", "linear_attention"],
                           mlp_layer_types=["dense", "sparse", "sparse"])
    out["kolibri1"] = c("kolibri1", head_dim=16, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                        num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2, sliding_window=16,
                        layer_types=["sliding_attention", "full_attention"])
    out["laguna"] = c("laguna", head_dim=16, intermediate_size=96, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2,
                      sliding_window=16, layer_types=["full_attention", "sliding_attention"],
                      num_attention_heads_per_layer=[4, 4], mlp_layer_types=["dense", "sparse"])
    out["lara_mini"] = c("lara_mini", **GDN, head_dim=16, moe_intermediate_size=32,
                         shared_expert_intermediate_size=48, num_hidden_layers=3, num_experts=8,
                         num_experts_per_tok=2, sliding_window=16,
                         layer_types=["linear_attention", "sliding_attention", "full_attention"])
    out["lfm2_moe"] = c("lfm2_moe", intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                        num_dense_layers=1, num_experts=8, num_experts_per_tok=2,
                        layer_types=["conv", "full_attention", "conv"])
    out["mellum"] = c("mellum", head_dim=16, moe_intermediate_size=32, num_hidden_layers=2, num_local_experts=8,
                      num_experts_per_tok=2, sliding_window=16, layer_types=["sliding_attention", "full_attention"],
                      mlp_layer_types=["sparse", "sparse"])
    out["mimo_v2_flash"] = c("mimo_v2_flash", head_dim=24, v_head_dim=16, intermediate_size=96,
                             moe_intermediate_size=32, num_hidden_layers=2, n_routed_experts=8,
                             num_experts_per_tok=2, sliding_window=16,
                             layer_types=["full_attention", "sliding_attention"], mlp_layer_types=["dense", "sparse"])
    out["minimax"] = c("minimax", head_dim=16, intermediate_size=48, num_hidden_layers=2, num_local_experts=4,
                       num_experts_per_tok=2, block_size=3, layer_types=["full_attention", "linear_attention"])
    out["nemotron_h"] = c("nemotron_h", head_dim=16, intermediate_size=96, moe_intermediate_size=32,
                          moe_shared_expert_intermediate_size=48, n_routed_experts=8, num_experts_per_tok=2,
                          n_shared_experts=1, layers_block_type=["linear_attention", "full_attention", "moe"],
                          mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16, n_groups=1, chunk_size=16,
                          use_mamba_kernels=False)
    out["qwen3_5_moe_text"] = c("qwen3_5_moe_text", **GDN, head_dim=16, moe_intermediate_size=32,
                                shared_expert_intermediate_size=48, num_hidden_layers=2, num_experts=8,
                                num_experts_per_tok=2, layer_types=["linear_attention", "full_attention"])
    out["solar_open"] = c("solar_open", head_dim=16, moe_intermediate_size=32, num_hidden_layers=2,
                          n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1)
    out["axk2"] = c("axk2", **MLA, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                    n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, index_topk=4, index_head_dim=16,
                    index_n_heads=8, gated_norm_rank=8, mlp_layer_types=["dense", "sparse", "sparse"],
                    layer_types=["indexed_attention"] * 3)
    out["bailing_hybrid"] = c("bailing_hybrid", **{k: v for k, v in MLA.items() if k != "q_lora_rank"},
                              q_lora_rank=None, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                              num_experts=8, num_experts_per_token=2, num_shared_experts=1, num_expert_group=4,
                              topk_group=2, first_k_dense_replace=1, linear_head_dim=16, linear_num_heads=4,
                              linear_conv_kernel_dim=4, layer_group_size=2, num_nextn_predict_layers=0,
                              layer_types=["linear_attention", "full_attention", "linear_attention"],
                              mlp_layer_types=["dense", "sparse", "sparse"])
    out["beam"] = c("beam", head_dim=16, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
                    num_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, sliding_window=16,
                    layer_types=["sliding_attention", "full_attention"], mlp_layer_types=["dense", "sparse"])
    out["dots3_note_text"] = c("dots3_note_text", **MLA, head_dim=16, intermediate_size=96, moe_intermediate_size=32,
                               shared_experts_intermediate_size=48, num_hidden_layers=3, n_routed_experts=8,
                               num_experts_per_tok=2, n_shared_experts=1, index_topk=4, index_head_dim=16,
                               index_n_heads=8, sliding_window=16, per_layer_config={},
                               layer_types=["indexed_attention", "sliding_attention", "indexed_attention"],
                               mlp_layer_types=["dense", "sparse", "sparse"],
                               rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 50000.0},
                                                "indexed_attention": {"rope_type": "default",
                                                                      "rope_theta": 80000000.0}})
    out["gemma4_text"] = c("gemma4_text", head_dim=16, global_head_dim=16, per_layer_config={}, intermediate_size=96,
                           moe_intermediate_size=32, num_hidden_layers=2, enable_moe_block=True, num_experts=8,
                           top_k_experts=2, sliding_window=16, vocab_size_per_layer_input=VOCAB,
                           hidden_size_per_layer_input=16, layer_types=["sliding_attention", "full_attention"])
    out["hy_v4"] = c("hy_v4", **MLA, head_dim=8, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                     n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, index_topk=4, index_head_dim=16,
                     index_n_heads=8, hc_mult=2, mlp_layer_types=["dense", "sparse", "sparse"],
                     layer_types=["indexed_attention"] * 3, indexer_types=["full", "shared", "full"])
    out["deepseek_v4"] = c("deepseek_v4", **{**COMMON, "num_key_value_heads": 1}, head_dim=32, q_lora_rank=32,
                           moe_intermediate_size=32, num_hidden_layers=3, n_routed_experts=8, num_experts_per_tok=2,
                           n_shared_experts=1, compress_rates={"compressed_sparse_attention": 4,
                                                               "heavily_compressed_attention": 8},
                           hc_mult=2, hc_sinkhorn_iters=3, o_groups=2, o_lora_rank=16, index_n_heads=8,
                           index_head_dim=16, index_topk=4, sliding_window=16, num_nextn_predict_layers=0, partial_rotary_factor=0.25,
                           rope_parameters={"main": {"rope_type": "default", "rope_theta": 10000.0,
                                                     "partial_rotary_factor": 0.25},
                                            "compress": {"rope_type": "default", "rope_theta": 160000.0,
                                                         "partial_rotary_factor": 0.25}},
                           layer_types=["compressed_sparse_attention", "heavily_compressed_attention",
                                        "compressed_sparse_attention"],
                           mlp_layer_types=["hash_moe", "moe", "moe"])
    out["minimax_m3_vl_text"] = c("minimax_m3_vl_text", head_dim=16, intermediate_size=32, dense_intermediate_size=96,
                                  shared_intermediate_size=48, num_hidden_layers=2, num_local_experts=8,
                                  num_experts_per_tok=2, rotary_dim=8, index_n_heads=2, index_head_dim=16,
                                  index_block_size=4, index_topk_blocks=2, index_local_blocks=1,
                                  layer_types=["full_attention", "minimax_m3_sparse"],
                                  mlp_layer_types=["dense", "sparse"])
    out["zaya"] = c("zaya", head_dim=16, moe_intermediate_size=32, num_hidden_layers=2, num_experts=8,  # top-1 only
                    num_experts_per_tok=1, router_hidden_size=32, sliding_window=16,
                    layer_types=["hybrid_sliding", "hybrid"])
    inkling = dict(head_dim=16, swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=16,
                   sliding_window_size=16, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2)
    out["inkling_text"] = c("inkling_text", **inkling, intermediate_size=96, n_shared_experts=1, num_hidden_layers=2,
                            layer_types=["hybrid_sliding", "hybrid"], mlp_layer_types=["sparse", "sparse"])
    out["inkling2_text"] = c("inkling2_text", **inkling, unpadded_vocab_size=VOCAB, num_hidden_layers=2,
                             n_layers_per_attn_res_block=1, layer_types=["hybrid_sliding", "hybrid"])
    out["inkling2_loop_text"] = c("inkling2_loop_text", **inkling, unpadded_vocab_size=VOCAB, num_hidden_layers=3,
                                  n_layers_per_attn_res_block=1, loop_layer_index_start=1, loop_layer_index_end=2,
                                  loop_num_passes=2, loop_gate_rank=8,
                                  layer_types=["hybrid_sliding", "hybrid", "hybrid_sliding"])
    # eight indexer heads: with two, the ReLU'd block scores of a random model often tie at zero, and
    # torch's topk breaks ties in an order of its own (onnxruntime's TopK: lowest index first)
    out["qwen4_exp_text"] = c("qwen4_exp_text", **GDN, head_dim=16, moe_intermediate_size=32,
                              shared_expert_intermediate_size=48, num_hidden_layers=2, num_experts=8,
                              num_experts_per_tok=2, hc_count=2, hc_lowrank=8, ngram_vocab_size_base=1024,
                              make_ngram_vocab_size_divisible_by=8, heads_per_ngram=2, split_ngram_parts=4,
                              indexer_n_heads=8, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=8,
                              indexer_compress_ratio=2, layer_types=["linear_attention", "indexed_attention"])
    # new in transformers 5.25
    out["ergo"] = c("ergo", head_dim=16, first_dense_intermediate_size=96, num_dense_blocks=1, moe_intermediate_size=32,
                    shared_intermediate_size=48, num_hidden_layers=3, num_experts=8, num_experts_per_tok=2,
                    moe_routed_scaling_factor=1.5, sliding_window=16,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                    mlp_layer_types=["dense", "sparse", "sparse"])
    out["minicpm5_moe"] = c("minicpm5_moe", head_dim=16, intermediate_size=96, moe_intermediate_size=32,
                            num_hidden_layers=3, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                            n_group=1, topk_group=1, routed_scaling_factor=1.5, norm_topk_prob=True,
                            mlp_layer_types=["dense", "sparse", "sparse"])
    # LongCat-Flash's router also picks among "zero-computation" experts (its input passed through)
    out["longcat_flash"] = c("longcat_flash", **MLA, head_dim=8, qk_head_dim=16, num_layers=2, ffn_hidden_size=96,
                             moe_topk=2, n_routed_experts=8, zero_expert_num=4, expert_ffn_hidden_size=32,
                             routed_scaling_factor=1.5)
    # types whose causal LM is another family's class under their own config (no modeling file)
    out["param2moe"] = c("param2moe", head_dim=16, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                         n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1)
    out["sarvam_moe"] = c("sarvam_moe", head_dim=16, intermediate_size=96, moe_intermediate_size=32,
                          num_hidden_layers=3, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                          first_k_dense_replace=1)
    out["sarvam_mla"] = c("sarvam_mla", **{k: v for k, v in MLA.items() if k != "q_lora_rank"}, q_lora_rank=None,
                          intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3, n_routed_experts=8,
                          num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1)
    out["kolibri1_1"] = c("kolibri1_1", head_dim=16, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                          num_hidden_layers=3, num_local_experts=8, num_experts_per_tok=2, sliding_window=16,
                          layer_types=["sliding_attention", "indexed_attention", "sliding_attention"],
                          index_layers=[1], kv_source_layers=[0, 1, 2], index_topk=4, index_pool_size=8,
                          index_compression=2, index_num_heads=2, index_num_local_tokens=4, index_num_sink_tokens=1,
                          mlp_only_layers=[0], mlp_only_intermediate_size=96)
    return out


ARCHITECTURES = tuple(configs())
# the model types moec compiles (bench/coverage.py lists why the others are refused)
SUPPORTED = tuple(arch for arch in (
    "afmoe", "aria_text", "axk1", "axk2", "bailing_hybrid", "beam", "cohere2_moe", "deepseek_v2", "deepseek_v3",
    "deepseek_v32", "deepseek_v4", "dots1", "dots3_note_text", "ergo", "ernie4_5_moe", "exaone_moe", "flex_olmo",
    "flint", "gemma4_text", "glm4_moe", "glm4_moe_lite", "glm_moe_dsa", "gpt_oss", "granitemoe", "granitemoe_swa",
    "granitemoehybrid", "granitemoeshared", "hunyuan_v1_moe", "hy_v3", "hy_v4", "inkling2_loop_text", "inkling2_text",
    "inkling_text", "jamba", "kimi_linear", "kolibri1", "kolibri1_1", "laguna", "lara_mini", "lfm2_moe",
    "longcat_flash", "mellum", "mimo_v2_flash", "minicpm5_moe", "minimax", "minimax_m2", "minimax_m3_vl_text",
    "mixtral", "nemotron_h", "olmoe", "param2moe", "phimoe", "qwen2_moe", "qwen3_5_moe_text", "qwen3_moe", "qwen3_next",
    "qwen4_exp_text", "sarvam_mla", "sarvam_moe", "solar_open", "zaya") if arch in ARCHITECTURES)
REFUSED = tuple(arch for arch in ARCHITECTURES if arch not in SUPPORTED)


def families(archs=SUPPORTED) -> list:
    """pytest parameters, one per family, each in its own xdist group: a family's tests run in one
    worker, which compiles (and traces) it once."""
    import pytest

    return [pytest.param(arch, marks=pytest.mark.xdist_group(arch)) for arch in archs]


def byte_tokenizer():
    """A byte-level BPE tokenizer with exactly 256 tokens (one per byte, no merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet(), key=lambda ch: ch.encode("utf-8"))
    tokenizer = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


# seeds 0 and 1 give a tiny Zaya that repeats one token, which makes generation tests weak; seed 0
# gives a tiny LongCat-Flash whose random score-correction biases send no token to two real experts
# (the others go to zero-computation experts), so pruning would have nothing to drop
SEEDS = {"zaya": 2, "longcat_flash": 2}


def save_tiny(arch: str, folder: Path, seed: int | None = None, config=None, **overrides):
    """Build the family's tiny random model (its config changed by `overrides`; `config` instead of
    the tiny one), save it (safetensors) with a tokenizer; return it."""
    import transformers

    transformers.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    torch.manual_seed(SEEDS.get(arch, 0) if seed is None else seed)
    config = config or configs()[arch]
    for key, value in overrides.items():
        setattr(config, key, value)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        # tensors some families initialize to zero (routers, score-correction biases, expert biases)
        # would make every routing a tie; random values make them matter
        for tensor in model.state_dict().values():
            if tensor.is_floating_point() and tensor.numel() and not tensor.any():
                tensor.copy_(torch.randn_like(tensor) * 0.1)
            elif tensor.dim() == 2 and tensor.shape[0] == config.vocab_size and not tensor.any():
                # a token -> experts table (DeepSeek-V4's hash routing): k distinct experts per token
                experts = next(getattr(config, key) for key in ("n_routed_experts", "num_local_experts", "num_experts")
                               if hasattr(config, key))
                tensor.copy_(torch.rand(tensor.shape[0], experts).argsort(-1)[:, :tensor.shape[1]])
    model.save_pretrained(folder)
    byte_tokenizer().save(str(Path(folder) / "tokenizer.json"))
    (Path(folder) / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    return model
