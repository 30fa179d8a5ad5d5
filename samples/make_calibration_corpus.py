"""Write moec/data/calibration.txt, the default `moec calibrate` corpus.

English prose and code from the Python standard library's own documentation strings (PSF
license), which every machine with Python has: deterministic for a given Python version.
Run from the repository root: python samples/make_calibration_corpus.py
"""

import importlib
import inspect
import sys
from pathlib import Path

MODULES = ["abc", "argparse", "array", "asyncio", "base64", "bisect", "calendar", "collections",
           "concurrent.futures", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime",
           "decimal", "difflib", "email", "enum", "fractions", "functools", "glob", "gzip", "hashlib",
           "heapq", "html", "http.client", "inspect", "io", "itertools", "json", "logging", "math",
           "operator", "os", "pathlib", "pickle", "queue", "random", "re", "shutil", "socket", "sqlite3",
           "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
           "time", "timeit", "typing", "unittest", "urllib.parse", "uuid", "warnings", "weakref", "zipfile"]
TARGET_CHARS = 400_000


def docs(module) -> list[str]:
    parts = [inspect.getdoc(module) or ""]
    for name, member in sorted(vars(module).items()):
        if name.startswith("_") or getattr(member, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(member) or inspect.isfunction(member):
            doc = inspect.getdoc(member)
            if doc and len(doc) > 80:
                parts.append(f"{name}\n{doc}")
    return parts


def main() -> None:
    chunks, size = [], 0
    for name in MODULES:
        for text in docs(importlib.import_module(name)):
            if size >= TARGET_CHARS:
                break
            chunks.append(text.strip())
            size += len(text)
    out = Path(__file__).resolve().parents[1] / "moec" / "data" / "calibration.txt"
    out.write_text("\n\n".join(chunks) + "\n", encoding="utf-8")
    print(f"wrote {out} ({out.stat().st_size} bytes) from Python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
