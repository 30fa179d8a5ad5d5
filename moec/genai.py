"""genai_config.json: what onnxruntime-genai needs to load an artifact folder as it is.

onnxruntime-genai runs the artifact as a generic decoder-only model (its "llama" type): the
inputs, outputs and KV-cache names are the optimum ones moec exports, and every family's own
computation (routing, pruning, sliding windows, scalings) is inside the graph. What genai cannot
hold is a cache whose keys and values differ in shape across layers or from each other (one
`head_size` and `num_key_value_heads` for all): DeepSeek-V3's compressed MLA cache is such a case;
nor can it carry anything else from step to step (a linear-attention state, a sparse-attention
indexer's keys, DeepSeek-V4's compressor buffers and entries).
"""

from __future__ import annotations

GENAI_CONFIG_FILE = "genai_config.json"
GENAI_MODEL_TYPE = "llama"
GENAI_SESSION_OPTIONS = ("intra_op_num_threads", "graph_optimization_level", "enable_cpu_mem_arena")


def genai_config(config: dict, past_shapes: dict[str, tuple], session_options: dict,
                 kv_in_place: list[str] = ()) -> tuple[dict | None, str | None]:
    """(genai_config.json content, None), or (None, why the artifact cannot fit onnxruntime-genai).

    `past_shapes` are the past_key_values inputs' names and shapes (keys and values [batch, kv heads,
    past, head size]); `session_options` the target's (the ones genai's decoder session takes are
    passed on). Where every past is appended to in place (`kv_in_place`: GroupQueryAttention), genai
    keeps one buffer per past for the whole sequence (its past_present_share_buffer): measured on the
    OLMoE-proportioned 2.5-bit artifact, 108.6-111.9 tok/s against 95.7-96.8 concatenating."""
    states = sorted({name.rpartition(".")[2] for name in past_shapes if not name.endswith((".key", ".value"))})
    if states:
        return None, ("onnxruntime-genai's decoder has slots for keys and values only; this model also carries "
                      f"{', '.join(states)} (linear-attention state, an indexer's keys and positions, or a "
                      "compressed attention's buffers and entries) "
                      "from step to step")
    layouts = {(shape[1], shape[3]) for shape in past_shapes.values()}
    if len(layouts) != 1:
        return None, ("onnxruntime-genai takes one KV-cache layout (num_key_value_heads, head_size) for every "
                      f"layer's keys and values; this model caches {sorted(layouts)}")
    kv_heads, head_size = layouts.pop()
    eos = config.get("eos_token_id")
    eos = eos if eos is not None else 0  # genai requires one in [0, vocab): a model without any stops at 0
    first_eos = eos[0] if isinstance(eos, list) else eos
    pad = config.get("pad_token_id")
    return {
        "model": {
            "type": GENAI_MODEL_TYPE,
            "vocab_size": config["vocab_size"],
            "context_length": config.get("max_position_embeddings", 4096),
            "bos_token_id": config.get("bos_token_id") if config.get("bos_token_id") is not None else first_eos,
            "eos_token_id": eos,
            "pad_token_id": pad if pad is not None else first_eos,
            "decoder": {
                "filename": "model.onnx",
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": [],
                                    **{key: session_options[key] for key in GENAI_SESSION_OPTIONS}},
                "hidden_size": config["hidden_size"],
                "num_attention_heads": config["num_attention_heads"],
                "num_key_value_heads": kv_heads,
                "head_size": head_size,
                "num_hidden_layers": config["num_hidden_layers"],
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "max_length": config.get("max_position_embeddings", 4096), "min_length": 0,
                   "num_beams": 1, "num_return_sequences": 1,
                   "past_present_share_buffer": bool(kv_in_place) and set(kv_in_place) == set(past_shapes),
                   "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }, None
