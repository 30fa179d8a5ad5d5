"""Speed at equal quality: bench/size_quality.py's perplexity rises joined with bench/compare.py's speeds.

    python bench/speed_at_quality.py --quality SQ_WORKDIR/results.json --speed CMP/results.json [--speed ...]
        [--quantizer gptq-weighted] [--plot FILE.png] [--json]

Quality comes from a trained checkpoint (size_quality.py), speed from compare.py's random bench shapes
(their weights do not change a kernel's speed): a format is joined by name. moec's "B-bit" rows take
the quality of `--quantizer` (GPTQ and the grid change codes, not kernels) and compare.py's "moec B-bit"
speed; llama.cpp's formats take the speed llama-bench measured for the same type (an importance matrix
changes the values, not the kernels). A format missing on either side is listed, not guessed. For each
llama.cpp format it prints the fastest moec format of equal or smaller rise and its decode ratio, per
shape: "at the quality a user accepts, moec decodes X times faster".
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path


def speed_names(system: str) -> list[str]:
    """compare.py's row names for size_quality.py's format: a type's plain GGUF, else its GGUF made
    with an importance matrix (the i-quants, which need one)."""
    if moec := re.fullmatch(r"moec ([\d.]+)-bit .*", system):
        return [f"moec {moec[1]}-bit"]
    if peer := re.fullmatch(r"llama\.cpp (?:\+ imatrix )?(\S+)", system):
        return [f"llama.cpp {peer[1]}, llama-bench", f"llama.cpp {peer[1]} + imatrix, llama-bench"]
    return []


def joined(quality: dict, speeds: list[dict], quantizer: str) -> tuple[list[dict], list[str]]:
    """Rows of (format, rise %, bytes, decode and prefill tok/s per shape), and the formats left out."""
    shapes = {model["model"]: {row["system"]: row for row in model["rows"]}
              for run in speeds for model in run["models"]}
    rows, missing = [], []
    for q in quality["rows"]:
        if q["family"].startswith("moec") and q["family"] != f"moec {quantizer}":
            continue
        names = speed_names(q["system"])
        measured = {shape: next(rows_[n] for n in names if n in rows_)
                    for shape, rows_ in shapes.items() if any(n in rows_ for n in names)}
        if not measured:
            missing.append(f"{q['system']}: no speed row {' or '.join(map(repr, names)) or 'of its kind'}")
            continue
        rows.append({"system": q["system"], "family": q["family"], "rise_pct": 100 * q["relative_rise"],
                     "mib": q["bytes"] / 2**20,
                     "decode_tok_s": {s: r["decode_tok_s"] for s, r in measured.items()},
                     "prefill_tok_s": {s: r["prefill_tok_s"] for s, r in measured.items()}})
    return rows, missing


def claims(rows: list[dict]) -> list[str]:
    """For each llama.cpp format: moec's fastest format of equal or smaller rise, per shape."""
    lines = []
    moec = [r for r in rows if r["family"].startswith("moec")]
    for peer in (r for r in rows if not r["family"].startswith("moec")):
        for shape, speed in peer["decode_tok_s"].items():
            candidates = [r for r in moec if r["rise_pct"] <= peer["rise_pct"] and shape in r["decode_tok_s"]]
            if not candidates:
                lines.append(f"{peer['system']} ({peer['rise_pct']:+.2f}%), {shape}: no moec format of equal or "
                             "smaller rise")
                continue
            best = max(candidates, key=lambda r: r["decode_tok_s"][shape])
            ours = best["decode_tok_s"][shape]
            lines.append(f"{peer['system']} ({peer['rise_pct']:+.2f}%), {shape}: {best['system']} "
                         f"({best['rise_pct']:+.2f}%) decodes {ours / speed:.2f}x ({ours:.1f} against "
                         f"{speed:.1f} tok/s)")
    return lines


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({s for r in rows for s in r["decode_tok_s"]})
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for family in sorted({r["family"] for r in rows}):
            points = sorted((r["rise_pct"], r["decode_tok_s"][shape], r["system"]) for r in rows
                            if r["family"] == family and shape in r["decode_tok_s"])
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=family)
            for x, y, name in points:
                ax.annotate(name.split(" ", 1)[1] if family.startswith("moec") else name.rsplit(" ", 1)[1], (x, y),
                            fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set(title=f"{shape}-proportioned", xlabel="perplexity rise over own baseline (%)", ylabel="decode tok/s")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quality", type=Path, required=True, help="bench/size_quality.py's results.json")
    parser.add_argument("--speed", type=Path, action="append", required=True,
                        help="bench/compare.py's results.json (repeat for runs of other shapes)")
    parser.add_argument("--quantizer", default="gptq-weighted", help="which moec quantizer's quality (default: "
                        "gptq-weighted, the planner's default for GPTQ)")
    parser.add_argument("--plot", type=Path, help="write decode tok/s against perplexity rise as a PNG")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    for path in (args.quality, *args.speed):
        if not path.is_file():
            sys.exit(f"speed_at_quality.py: error: no such file: {path}")
    speeds = [json.loads(p.read_text()) for p in args.speed]
    rows, missing = joined(json.loads(args.quality.read_text()), speeds, args.quantizer)
    if not rows:
        sys.exit("speed_at_quality.py: error: no format has both a quality and a speed")
    result = {"machines": [run["machine"] for run in speeds], "rows": rows, "missing": missing, "claims": claims(rows)}
    if args.plot:
        plot(rows, args.plot)
    if args.json:
        print(json.dumps(result, indent=1))
        return
    shapes = sorted({s for r in rows for s in r["decode_tok_s"]})
    print("| format | MiB (trained) | rise | " + " | ".join(f"{s} decode / prefill tok/s" for s in shapes) + " |")
    print("|---|---|---|" + "---|" * len(shapes))
    for r in sorted(rows, key=lambda r: r["rise_pct"]):
        speed = " | ".join(f"{r['decode_tok_s'][s]:.1f} / {r['prefill_tok_s'][s]:.0f}" if s in r["decode_tok_s"]
                           else "-" for s in shapes)
        print(f"| {r['system']} | {r['mib']:.2f} | {r['rise_pct']:+.2f}% | {speed} |")
    print()
    for line in [*result["claims"], *(f"left out: {m}" for m in missing)]:
        print(line)
    m = speeds[0]["machine"]
    print(f"\nspeed: {m['cpu']} (ISA: {' '.join(m['isa'])}), {m['threads']} threads, read bandwidth "
          f"{m['read_bandwidth_gb_s']:.1f} GB/s")


if __name__ == "__main__":
    main()
