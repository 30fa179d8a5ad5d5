"""Running an artifact: onnxruntime, numpy and tokenizers only (no torch, no transformers).

An artifact folder holds model.onnx (+ external data), moec.json, config.json and the
tokenizer files; `Artifact` opens it and `generate` runs greedy decoding with the KV cache.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort

from moec.errors import MoecError
from moec.ops.moe import ACTIVATIONS_OUTPUT, LOGITS_TO_KEEP, PRUNE_SWITCH

MODEL_FILE = "model.onnx"
RECORD_FILE = "moec.json"


class Artifact:
    """An onnxruntime session over an artifact folder, with the KV-cache layout read from it.

    `prune=False` runs a dynamically pruned artifact with pruning off (its prune_experts input).
    `activations` counts, over every forward, the (token, expert) pairs the MoE layers computed
    and the pairs plain top-k routing would have computed. `model_file` (a variant of the model
    beside it, as verification runs) and `log_severity` (onnxruntime's, for this session) are for
    moec's own checks."""

    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int | None = None,
                 prune: bool = True, model_file: str = MODEL_FILE, log_severity: int | None = None):
        self.path = Path(path)
        if not (self.path / model_file).is_file():
            raise MoecError(f"{self.path} is not a moec artifact (no {model_file})")
        self.record = read_record(self.path)
        options = session_options(self.record, threads)
        if log_severity is not None:
            options.log_severity_level = log_severity
        self.session = ort.InferenceSession(str(self.path / model_file), options,
                                            providers=providers or available_providers(self.record.get("providers")))
        # the KV cache lives where the model runs: present outputs are bound there and fed back as the
        # next step's past without a copy through NumPy
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self.past_inputs = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.keeps_logits = any(i.name == LOGITS_TO_KEEP for i in self.session.get_overridable_initializers())
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.pruning = "off" if not prune else "on" if self.record.get("pruning") else "none"
        self.switches = {PRUNE_SWITCH: np.array(False)} if self.pruning == "off" and self.record.get("pruning") else {}
        self.present_of = {i.name: present_name(i.name) for i in self.past_inputs}
        self.in_place = set(self.record.get("kv_in_place", ()))
        top_k = {int(layer["layer"]): int(layer["top_k"]) for layer in self.record.get("moe_layers", [])}
        self.top_k_of = {name: top_k[int(name.rpartition(".")[2])] for name in self.output_names
                         if name.startswith(ACTIVATIONS_OUTPUT + ".")}  # each MoE layer's count output
        self.activations = {"computed": 0, "top_k": 0}
        config = json.loads((self.path / "config.json").read_text())
        self.eos_token_ids = _eos_ids(self.path, config)

    def empty_cache(self, batch: int, capacity: int = 0) -> dict[str, ort.OrtValue]:
        """The past for a fresh sequence, on the session's device: zero-length keys and values, but
        where the graph appends in place (`kv_in_place`) a buffer of `capacity` tokens, which each
        step then fills without copying the cache (forward binds it as its own present)."""
        return {name: ort.OrtValue.ortvalue_from_numpy(array, self.device)
                for name, array in empty_past(self.session, batch, capacity, self.in_place).items()}

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                past: dict[str, ort.OrtValue], logits_to_keep: int = 0) -> tuple[np.ndarray, dict[str, ort.OrtValue]]:
        """One step: logits [B, S, V] (of the last `logits_to_keep` positions only, where that is not
        0 and the artifact takes it) and the next past (this step's presents, left on the device)."""
        binding = self.session.io_binding()
        host = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64),
                "position_ids": position_ids.astype(np.int64), **self.switches}
        if self.keeps_logits:
            host[LOGITS_TO_KEEP] = np.array(logits_to_keep, np.int64)
        for name, value in host.items():  # as OrtValues: the switch is an initializer-backed input
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value)))
        shared = {}  # present name -> its past's buffer, where the buffer has room for this step
        total = attention_mask.shape[1]
        for name, value in past.items():
            binding.bind_ortvalue_input(name, value)
            held = value.shape()[2] if name in self.in_place else None
            if held is not None and held >= total:
                shared[self.present_of[name]] = value
            elif held is not None and held != total - input_ids.shape[1]:
                # read as a whole past it would hold rows that were never written
                raise MoecError(f"{name} holds {held} tokens: neither room for the {total} this step reaches "
                                "nor exactly the earlier ones (give empty_cache a capacity of at least the "
                                "sequence's length)")
        for name in self.output_names:
            if name in shared:
                binding.bind_ortvalue_output(name, shared[name])
            else:
                binding.bind_output(name, "cpu" if name == "logits" or name in self.top_k_of else self.device)
        self.session.run_with_iobinding(binding)
        outputs = dict(zip(self.output_names, binding.get_outputs()))
        for name, top_k in self.top_k_of.items():
            self.activations["computed"] += int(outputs[name].numpy())
            self.activations["top_k"] += input_ids.size * top_k
        logits = outputs["logits"].numpy().astype(np.float32, copy=False)  # float16 on CUDA targets
        # a shared buffer is passed on as the OrtValue that owns it (get_outputs' view of it does not)
        return logits, {past: shared.get(present, outputs[present]) for past, present in self.present_of.items()}


def present_name(past_name: str) -> str:
    """The output that gives a past input's next value: past_key_values.{i}.{slot} -> present.{i}.{slot}."""
    return "present." + past_name.removeprefix("past_key_values.")


def empty_past(session: ort.InferenceSession, batch: int, capacity: int = 0,
               in_place: set[str] = frozenset()) -> dict[str, np.ndarray]:
    """A fresh sequence's past inputs in the session's dtype (float16 for CUDA artifacts): keys and
    values [batch, kv heads, 0, head size] (`capacity` tokens of zeros for those `in_place`), and
    zeros for a linear-attention layer's conv and recurrent state, as each input declares it (an
    indexer's positions are int64)."""
    dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}
    return {i.name: np.zeros(empty_shape(i.shape, batch, capacity if i.name in in_place else 0), dtypes[i.type])
            for i in session.get_inputs() if i.name.startswith("past_key_values.")}


def empty_shape(shape, batch: int, tokens: int = 0) -> tuple[int, ...]:
    """A past input's shape at the start of a sequence: the batch first, `tokens` where the length is
    dynamic (keys and values), the declared size elsewhere (state)."""
    return (batch, *(d if isinstance(d, int) else tokens for d in shape[1:]))


def session_options(record: dict, threads: int | None = None) -> ort.SessionOptions:
    """The session options the artifact's target tuned (moec.json's `session_options`, the same ones
    its model metadata gives plain onnxruntime apps); `threads` overrides the intra-op thread count."""
    tuned = record.get("session_options", {})
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or tuned.get("intra_op_num_threads", 0)
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel,
                                               tuned.get("graph_optimization_level", "ORT_ENABLE_ALL"))
    options.enable_cpu_mem_arena = tuned.get("enable_cpu_mem_arena", True)
    for key, value in tuned.get("config_entries", {}).items():
        options.add_session_config_entry(key, value)
    return options


def available_providers(wanted: list[str] | None) -> list[str]:
    """The wanted execution providers (a target's, in its order) that this onnxruntime has; a CUDA
    artifact runs on the CPU provider where there is no GPU."""
    available = set(ort.get_available_providers())
    return [p for p in wanted or [] if p in available] or ["CPUExecutionProvider"]


def read_record(path: Path) -> dict:
    try:
        return json.loads((path / RECORD_FILE).read_text())
    except FileNotFoundError:
        raise MoecError(f"{path} is not a moec artifact (no {RECORD_FILE})") from None
    except json.JSONDecodeError as e:
        raise MoecError(f"{path / RECORD_FILE} is not valid JSON ({e})") from None


def _eos_ids(path: Path, config: dict) -> set[int]:
    eos = config.get("eos_token_id")
    generation = path / "generation_config.json"
    if generation.is_file():
        eos = json.loads(generation.read_text()).get("eos_token_id", eos)
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])


def left_pad(sequences: list[list[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and attention mask for a batch, padded on the left."""
    width = max(len(s) for s in sequences)
    ids = np.full((len(sequences), width), pad_id, np.int64)
    mask = np.zeros((len(sequences), width), np.int64)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = seq
        mask[row, width - len(seq):] = 1
    return ids, mask


def positions(attention_mask: np.ndarray, new_tokens: int) -> np.ndarray:
    """Position ids of the last `new_tokens` tokens: count of real tokens before each, pads at 0."""
    pos = np.cumsum(attention_mask, axis=-1) - 1
    return np.where(attention_mask == 0, 0, pos)[:, -new_tokens:]


def generate(artifact: Artifact, sequences: list[list[int]], max_new_tokens: int) -> Iterator[np.ndarray]:
    """Greedy decoding with the KV cache; yields each step's new token per sequence [B].

    A finished sequence (EOS) keeps yielding its EOS token until all are finished.
    """
    ids, mask = left_pad(sequences)
    past = artifact.empty_cache(len(sequences), capacity=ids.shape[1] + max_new_tokens)
    done = np.zeros(len(sequences), bool)
    eos_ids = sorted(artifact.eos_token_ids)
    step_ids = ids
    for _ in range(max_new_tokens):
        logits, past = artifact.forward(step_ids, mask, positions(mask, step_ids.shape[1]), past, logits_to_keep=1)
        token = logits[:, -1].argmax(-1)
        if eos_ids:
            token = np.where(done, eos_ids[0], token)
        yield token
        done |= np.isin(token, eos_ids)
        if done.all():
            return
        step_ids = token[:, None]
        mask = np.concatenate([mask, np.ones((len(sequences), 1), np.int64)], axis=1)


class Tokenizer:
    """The artifact's tokenizer.json through the `tokenizers` library."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as HFTokenizer

        file = Path(path) / "tokenizer.json"
        if not file.is_file():
            raise MoecError(f"{path} has no tokenizer.json (the tokenizers library needs one)")
        self.tokenizer = HFTokenizer.from_file(str(file))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def stream_text(tokenizer: Tokenizer, tokens: Iterator[int], write: Callable[[str], None]) -> list[int]:
    """Write decoded text as tokens arrive (re-decoding the tail so multi-byte pieces come out whole)."""
    generated, shown = [], ""
    for token in tokens:
        generated.append(int(token))
        text = tokenizer.decode(generated)
        if len(text) > len(shown) and not text.endswith("\ufffd"):
            write(text[len(shown):])
            shown = text
    text = tokenizer.decode(generated)
    if len(text) > len(shown):
        write(text[len(shown):])
    return generated
