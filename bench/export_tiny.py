"""Export time and artifact size of every family's tiny random model (issue 2's numbers).

Run from the repository root: python bench/export_tiny.py
"""

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import moec  # noqa: E402
import tiny  # noqa: E402


def main() -> None:
    print("| family | parameters | safetensors | artifact | compile s (trace s) | max logit diff |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as root:
        for arch in tiny.ARCHITECTURES:
            model_dir, out = Path(root, arch), Path(root, arch + "-onnx")
            tiny.save_tiny(arch, model_dir)
            start = time.perf_counter()
            record = moec.compile(model_dir, out, progress=False)
            total = time.perf_counter() - start
            print(f"| {arch} | {record['parameters']['total']:,} | {record['source_model']['weight_bytes']:,} | "
                  f"{record['bytes']['total']:,} | {total:.1f} ({record['seconds']['trace']:.1f}) | "
                  f"{record['verification']['max_abs_logit_diff']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
