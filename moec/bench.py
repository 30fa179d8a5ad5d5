"""`moec bench`: how fast an artifact runs in onnxruntime (onnxruntime and numpy only).

Each repetition feeds a fixed random prompt of `prompt_len` tokens (prefill, which is also the
time to the first token) and then decodes `gen_len` tokens greedily with the KV cache, ignoring
end-of-sequence so every run does the same work. With `data` (a text file), the prompt is the
text's first tokens and each decode step feeds the text's next token instead of its own pick, so
experts are routed as on that text (what calibration saw, where it is the calibration text). After
`warmup` untimed runs, the median of `repeats` runs is reported; peak memory is the process's peak
resident set.
"""

from __future__ import annotations

import resource
import statistics
import time
from pathlib import Path

import numpy as np

from moec.runtime import Artifact


def bench(path: str | Path, *, prompt_len: int = 128, gen_len: int = 64, threads: int | None = None,
          repeats: int = 5, warmup: int = 1, prune: bool = True, data: str | Path | None = None) -> dict:
    artifact = Artifact(path, threads=threads, prune=prune)
    vocab = next(o.shape[-1] for o in artifact.session.get_outputs() if o.name == "logits")
    text = None if data is None else _text_tokens(path, data, prompt_len + gen_len)
    prompt = (np.random.default_rng(0).integers(0, vocab, (1, prompt_len), dtype=np.int64) if text is None
              else text[None, :prompt_len])
    prefill, decode = [], []
    for run in range(warmup + repeats):
        artifact.activations = {"computed": 0, "top_k": 0}
        start = time.perf_counter()
        logits, past = artifact.forward(prompt, np.ones_like(prompt), np.arange(prompt_len)[None],
                                        artifact.empty_cache(1, capacity=prompt_len + gen_len), logits_to_keep=1)
        token = logits[:, -1].argmax(-1)[:, None] if text is None else text[None, prompt_len:prompt_len + 1]
        prefilled = time.perf_counter()
        for step in range(gen_len):
            total = prompt_len + step + 1
            logits, past = artifact.forward(token, np.ones((1, total), np.int64), np.array([[total - 1]]), past,
                                            logits_to_keep=1)
            token = logits[:, -1].argmax(-1)[:, None] if text is None else text[None, total:total + 1]
        done = time.perf_counter()
        if run >= warmup:
            prefill.append(prefilled - start)
            decode.append(done - prefilled)
    activations = artifact.activations
    result = {
        "path": str(path), "prompt_len": prompt_len, "gen_len": gen_len, "threads": threads, "repeats": repeats,
        "data": "random prompt, greedy" if data is None else str(data),
        "prefill_tok_s": prompt_len / statistics.median(prefill),
        "decode_tok_s": gen_len / statistics.median(decode),
        "ttft_ms": 1000 * statistics.median(prefill),
        "peak_rss_mb": peak_rss_mb(),
        "pruning": artifact.pruning,
    }
    if activations["top_k"] and result["pruning"] != "none":
        result["pruned_fraction"] = 1 - activations["computed"] / activations["top_k"]
    return result


def _text_tokens(path: str | Path, data: str | Path, count: int) -> np.ndarray:
    """The first `count` token ids of the text file `data`, by the artifact's tokenizer."""
    from moec.errors import MoecError
    from moec.runtime import Tokenizer
    from moec.text import read_text

    ids = np.array(Tokenizer(Path(path)).encode(read_text(data)[0])[:count], np.int64)
    if len(ids) < count:
        raise MoecError(f"{data} has {len(ids)} tokens, fewer than the {count} the prompt and decode take")
    return ids


def peak_rss_mb() -> float:
    """This process's peak resident set in MiB: Linux's VmHWM, which starts afresh at exec (ru_maxrss
    keeps the peak of the process that forked it), else ru_maxrss."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, bytes on macOS
