"""`moec eval`: perplexity of an artifact (onnxruntime) or of the source model (PyTorch) on the
same token windows, so the two are directly comparable.

The artifact path imports no torch; the model-folder path loads transformers only when asked.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moec.runtime import MODEL_FILE, Artifact, Tokenizer
from moec.text import read_text, token_windows


def _nll(logits: np.ndarray, ids: np.ndarray) -> float:
    """Summed negative log-likelihood of ids[:, 1:] under logits[:, :-1] (float64 log-softmax)."""
    logits = logits[:, :-1].astype(np.float64)
    top = logits.max(-1, keepdims=True)
    log_z = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    picked = np.take_along_axis(logits, ids[:, 1:, None], axis=-1)[..., 0]
    return float((log_z - picked).sum())


def _artifact_logits(artifact: Artifact):
    def logits(ids: np.ndarray) -> np.ndarray:
        positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
        return artifact.forward(ids, np.ones_like(ids), positions, artifact.empty_cache(len(ids)))[0]

    return logits


def _model_logits(path: Path):
    import torch

    from moec.checkpoint import load_model, open_checkpoint

    model = load_model(open_checkpoint(path))

    def logits(ids: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(ids)).logits.float().numpy()

    return logits


def evaluate(path: str | Path, data: str | Path, *, samples: int = 32, seq_len: int = 256,
             batch: int = 4, threads: int | None = None, prune: bool = True) -> dict:
    """Perplexity over up to `samples` windows of `seq_len` tokens of `data`; for an artifact also
    the (token, expert) pairs its MoE layers computed and the fraction pruning saved against
    plain top-k (`prune=False` runs it with pruning off)."""
    path = Path(path)
    is_artifact = (path / MODEL_FILE).is_file()
    text, source = read_text(data)
    windows = token_windows(Tokenizer(path).encode(text), samples, seq_len)
    artifact = Artifact(path, threads=threads, prune=prune) if is_artifact else None
    logits = _artifact_logits(artifact) if is_artifact else _model_logits(path)
    nll = sum(_nll(logits(chunk), chunk) for chunk in np.array_split(windows, -(-len(windows) // batch)))
    tokens = int(windows.shape[0] * (windows.shape[1] - 1))
    result = {"perplexity": float(np.exp(nll / tokens)), "tokens": tokens, "nll": nll,
              "samples": int(windows.shape[0]), "seq_len": seq_len, "data": source,
              "runtime": "onnxruntime" if is_artifact else "pytorch", "path": str(path)}
    if artifact is not None and artifact.activations["top_k"]:
        computed, plain = artifact.activations["computed"], artifact.activations["top_k"]
        result |= {"expert_activations": computed, "top_k_activations": plain,
                   "pruned_fraction": 1 - computed / plain,
                   "pruning": artifact.pruning}
    return result
