"""Which MoE model types of the installed transformers moec compiles: docs/models.md's coverage table.

A model type counts when transformers can build it as a causal language model
(`AutoModelForCausalLM`; a multimodal family through its text decoder's config) and its modeling
code decorates an experts class with `use_experts_implementation`. For each, the suite's tiny
random model (tests/tiny.py) is saved and compiled in float; the row says "supported" with the
verification error and the trace (torch.onnx export) time, or the one-line reason compile refused
it with its reason code (moec.errors.Unsupported). A type without a tiny config is listed as untried.

    python bench/coverage.py [--types mixtral,olmoe] [--json] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def moe_model_types() -> list[str]:
    """Causal-LM model types whose modeling module decorates an experts class."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    decorated, folder_of = set(), {}
    for path in (Path(transformers.__file__).parent / "models").glob("*/modeling_*.py"):
        source = path.read_text()
        if "@use_experts_implementation" in source:
            decorated.add(path.parent.name)
        for name in re.findall(r"^class (\w+)\(", source, re.M):
            folder_of[name] = path.parent.name
    return sorted(model_type for model_type, class_name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()
                  if folder_of.get(class_name) in decorated)


def try_type(model_type: str, configs: dict, work: Path) -> dict:
    import moec
    import tiny
    from moec.errors import MoecError, Unsupported

    if model_type not in configs:
        return {"model_type": model_type, "status": "untried", "reason": "no tiny config in tests/tiny.py"}
    tiny.save_tiny(model_type, work / model_type / "model")
    start = time.perf_counter()
    try:
        record = moec.compile(work / model_type / "model", work / model_type / "artifact", force=True, progress=False)
    except MoecError as e:
        code = f"[{e.reason}] " if isinstance(e, Unsupported) else ""
        return {"model_type": model_type, "status": "refused", "reason": f"{code}{e}"}
    except Exception as e:  # a bug to fix: reported, not hidden
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return {"model_type": model_type, "status": "error", "reason": f"{type(e).__name__}: {first}"[:300]}
    return {"model_type": model_type, "status": "supported", "seconds": round(time.perf_counter() - start, 1),
            "trace_seconds": record["seconds"]["trace"],
            "max_abs_logit_diff": record["verification"]["max_abs_logit_diff"],
            "moe_layers": len(record["moe_layers"]),
            "activation": sorted({e["experts"]["activation"] for e in record["moe_layers"]})}


def markdown(rows: list[dict]) -> str:
    lines = ["| model type | status | trace s | max logit diff vs transformers | reason |", "|---|---|---|---|---|"]
    for r in rows:
        if r["status"] == "supported":
            lines.append(f"| {r['model_type']} | supported | {r['trace_seconds']:.1f} | {r['max_abs_logit_diff']:.1e} | |")
        else:
            lines.append(f"| {r['model_type']} | {r['status']} | | | {r['reason'].replace('|', '/')} |")
    return "\n".join(lines)


def main() -> None:
    import torch

    import tiny

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", help="comma-separated model types (default: every MoE causal LM type)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    types = args.types.split(",") if args.types else moe_model_types()
    configs = tiny.configs()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for model_type in types:
            rows.append(try_type(model_type, configs, Path(work)))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    table = markdown(rows)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    print(json.dumps(rows, indent=2) if args.json else table)


if __name__ == "__main__":
    main()
