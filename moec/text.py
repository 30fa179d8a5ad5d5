"""Calibration and evaluation text: read safely, cut into token windows (numpy only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moec.errors import MoecError

DEFAULT_CORPUS = Path(__file__).parent / "data" / "calibration.txt"


def read_text(path: str | Path | None) -> tuple[str, str]:
    """(text, name) of the calibration file, or of the built-in corpus when path is None."""
    path = Path(path) if path is not None else DEFAULT_CORPUS
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MoecError(f"calibration data not found: {path}") from None
    except UnicodeDecodeError:
        raise MoecError(f"calibration data {path} is not UTF-8 text") from None
    if "\x00" in text:
        raise MoecError(f"calibration data {path} looks binary (it contains NUL bytes)")
    if not text.strip():
        raise MoecError(f"calibration data {path} is empty")
    return text, ("builtin:" + path.name) if path == DEFAULT_CORPUS else str(path)


def token_windows(ids: list[int], samples: int, seq_len: int) -> np.ndarray:
    """Up to `samples` non-overlapping windows of seq_len tokens, spread evenly over the text."""
    available = len(ids) // seq_len
    if available == 0:
        raise MoecError(f"calibration text has {len(ids)} tokens, fewer than one sequence "
                        f"of --seq-len {seq_len}")
    starts = np.linspace(0, available - 1, min(samples, available)).round().astype(int) * seq_len
    return np.stack([np.asarray(ids[s:s + seq_len], np.int64) for s in starts])
