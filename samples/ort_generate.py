"""Greedy generation from a moec artifact with plain onnxruntime, tokenizers and numpy.

No moec import: this is the template to copy into an application. The artifact's model.onnx
takes input_ids, attention_mask, position_ids and past_key_values.{i}.key|value (and, for a
linear-attention layer such as Qwen3-Next's, past_key_values.{i}.conv|recurrent: its state; for a
sparse-attention indexer such as DeepSeek-V3.2's, past_key_values.{i}.indexer_key, and Qwen4-Exp's
also past_key_values.{i}.indexer_position; a cache layer of a family's own, each tensor it keeps, by
name, such as MiniMax-M3's past_key_values.{i}.idx_keys), and returns
logits and present.{i}.*; each step feeds the previous step's presents back as the past.

    python samples/ort_generate.py out/tiny-mixtral --prompt "def main(" --max-new-tokens 48
"""

import argparse
import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

# take the session options moec tuned for the artifact's target from model.onnx's metadata (ort_config)
os.environ.setdefault("ORT_LOAD_CONFIG_FROM_MODEL", "1")
# errors only: onnxruntime's load-time warning that the overridable inputs (logits_to_keep,
# prune_experts) are not constants is true and expected (docs/artifact.md); a session's own
# log_severity_level gives way to the options read from the model, the default logger's does not
ort.set_default_logger_severity(3)


def eos_token_ids(artifact: Path) -> set[int]:
    """End-of-sequence ids: generation_config.json's if it has them, else config.json's."""
    eos = json.loads((artifact / "config.json").read_text()).get("eos_token_id")
    generation = artifact / "generation_config.json"
    if generation.is_file():
        eos = json.loads(generation.read_text()).get("eos_token_id", eos)
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])


def generate(artifact: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding of one sequence with the KV cache; stops at an end-of-sequence token."""
    session = ort.InferenceSession(str(artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    output_names = [o.name for o in session.get_outputs()]
    # a fresh sequence's cache, as the model declares it: keys and values [batch, kv heads, 0 past
    # tokens, head size]; a linear-attention layer's state (fixed size) starts as zeros; an indexer's
    # past positions are int64
    dtypes = {"tensor(float)": np.float32, "tensor(int64)": np.int64}
    past = {i.name: np.zeros([1, *(d if isinstance(d, int) else 0 for d in i.shape[1:])], dtypes[i.type])
            for i in session.get_inputs() if i.name.startswith("past_key_values.")}
    # logits of the last position only: a prompt's other positions would each pay the vocabulary-sized head
    optional = [i.name for i in session.get_overridable_initializers()]
    keep_last = {"logits_to_keep": np.array(1, np.int64)} if "logits_to_keep" in optional else {}
    stop = eos_token_ids(artifact)
    step = np.array([prompt_ids], np.int64)
    seen, generated = 0, []
    for _ in range(max_new_tokens):
        total = seen + step.shape[1]
        outputs = dict(zip(output_names, session.run(None, {
            "input_ids": step,
            "attention_mask": np.ones((1, total), np.int64),
            "position_ids": np.arange(seen, total, dtype=np.int64)[None],
            **keep_last, **past})))
        past = {name: outputs[name.replace("past_key_values.", "present.")] for name in past}
        token = int(outputs["logits"][0, -1].argmax())
        generated.append(token)
        if token in stop:
            break
        seen, step = total, np.array([[token]], np.int64)
    return generated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path, help="a moec artifact folder")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    tokenizer = Tokenizer.from_file(str(args.artifact / "tokenizer.json"))
    ids = generate(args.artifact, tokenizer.encode(args.prompt).ids, args.max_new_tokens)
    print(args.prompt + tokenizer.decode(ids, skip_special_tokens=True))


if __name__ == "__main__":
    main()
