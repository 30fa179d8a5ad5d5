"""`moec bench`: how fast an artifact runs in onnxruntime (onnxruntime and numpy only).

Each repetition feeds a fixed random prompt of `prompt_len` tokens (prefill, which is also the
time to the first token) and then decodes `gen_len` tokens greedily with the KV cache, ignoring
end-of-sequence so every run does the same work. After `warmup` untimed runs, the median of
`repeats` runs is reported; peak memory is the process's peak resident set.
"""

from __future__ import annotations

import resource
import statistics
import time
from pathlib import Path

import numpy as np

from moec.runtime import Artifact


def bench(path: str | Path, *, prompt_len: int = 128, gen_len: int = 64, threads: int | None = None,
          repeats: int = 5, warmup: int = 1, prune: bool = True) -> dict:
    artifact = Artifact(path, threads=threads, prune=prune)
    vocab = next(o.shape[-1] for o in artifact.session.get_outputs() if o.name == "logits")
    prompt = np.random.default_rng(0).integers(0, vocab, (1, prompt_len), dtype=np.int64)
    prefill, decode = [], []
    for run in range(warmup + repeats):
        artifact.activations = {"computed": 0, "top_k": 0}
        start = time.perf_counter()
        logits, past = artifact.forward(prompt, np.ones_like(prompt), np.arange(prompt_len)[None],
                                        artifact.empty_cache(1, capacity=prompt_len + gen_len), logits_to_keep=1)
        token = logits[:, -1].argmax(-1)[:, None]
        prefilled = time.perf_counter()
        for step in range(gen_len):
            total = prompt_len + step + 1
            logits, past = artifact.forward(token, np.ones((1, total), np.int64), np.array([[total - 1]]), past,
                                            logits_to_keep=1)
            token = logits[:, -1].argmax(-1)[:, None]
        done = time.perf_counter()
        if run >= warmup:
            prefill.append(prefilled - start)
            decode.append(done - prefilled)
    activations = artifact.activations
    result = {
        "path": str(path), "prompt_len": prompt_len, "gen_len": gen_len, "threads": threads, "repeats": repeats,
        "prefill_tok_s": prompt_len / statistics.median(prefill),
        "decode_tok_s": gen_len / statistics.median(decode),
        "ttft_ms": 1000 * statistics.median(prefill),
        "peak_rss_mb": peak_rss_mb(),
        "pruning": artifact.pruning,
    }
    if activations["top_k"] and result["pruning"] != "none":
        result["pruned_fraction"] = 1 - activations["computed"] / activations["top_k"]
    return result


def peak_rss_mb() -> float:
    """This process's peak resident set in MiB: Linux's VmHWM, which starts afresh at exec (ru_maxrss
    keeps the peak of the process that forked it), else ru_maxrss."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, bytes on macOS
