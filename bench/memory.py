"""Time and peak memory of `moec calibrate` and `moec compile` on an 8-layer Mixtral-proportioned
random checkpoint.

Builds the checkpoint (hidden 1024, intermediate 3584, 8 experts top-2, 8 layers, vocab 32000,
bf16 safetensors) with the sample's tokenizer, then runs calibrate, plan (2.5 average expert
bits) and compile, each in a fresh process, and reports each one's peak RSS next to the model's
size. Run from the repository root:
    python bench/memory.py [--workdir /tmp/moec-bench] [--samples 32] [--skip-calibrate]
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measured(argv: list[str]) -> dict:
    """Seconds, peak RSS and stdout of `moec ARGV` in a fresh process."""
    probe = (f"import resource, sys; from moec.cli import main; code = main({argv!r}); "
             "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(code)")
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    if run.returncode:
        sys.exit(f"moec {' '.join(argv)} failed:\n{run.stderr[-3000:]}")
    return {"seconds": round(time.perf_counter() - start, 1),
            "peak_rss_bytes": int(run.stdout.split()[-1]) * 1024,  # ru_maxrss is in KiB
            "stdout": run.stdout.rsplit("\n", 2)[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/moec-bench", type=Path)
    parser.add_argument("--samples", default=32, type=int)
    parser.add_argument("--seq-len", default=256, type=int)
    parser.add_argument("--avg-bits", default=2.5, type=float)
    parser.add_argument("--skip-calibrate", action="store_true", help="reuse WORKDIR/stats.json")
    args = parser.parse_args()
    model_dir = args.workdir / "mixtral-8L-h1024"
    if not (model_dir / "config.json").is_file():
        # the same checkpoint bench/compare.py measures as its Mixtral-proportioned model
        subprocess.run([sys.executable, str(ROOT / "bench" / "compare.py"), "--build", "mixtral", str(model_dir)],
                       check=True)
    weights = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    params = weights // 2
    stats, plan, artifact = args.workdir / "stats.json", args.workdir / "plan.json", args.workdir / "artifact"
    result = {"parameters": params, "safetensors_bytes": weights, "fp32_model_bytes": params * 4}
    if not args.skip_calibrate:
        calibrate = measured(["calibrate", str(model_dir), "--samples", str(args.samples),
                              "--seq-len", str(args.seq_len), "--out", str(stats), "--quiet"])
        result["calibrate"] = {"seconds": calibrate["seconds"], "peak_rss_bytes": calibrate["peak_rss_bytes"],
                               "samples": args.samples, "seq_len": args.seq_len}
    subprocess.run([sys.executable, "-m", "moec", "plan", "--stats", str(stats), "--avg-bits", str(args.avg_bits),
                    "--no-top-widths", "--out", str(plan)], check=True, capture_output=True)
    compile_run = measured(["compile", str(model_dir), "--out", str(artifact), "--plan", str(plan),
                            "--force", "--quiet"])
    record = json.loads((artifact / "moec.json").read_text())
    result["compile"] = {"seconds": compile_run["seconds"], "peak_rss_bytes": compile_run["peak_rss_bytes"],
                         "avg_bits": args.avg_bits,
                         "artifact_bytes": record["bytes"]["total"], "stages_seconds": record["seconds"],
                         "verification": record["verification"]}
    print(json.dumps(result, indent=1))
    for step in ("calibrate", "compile"):
        if step in result:
            print(f"{step}: peak RSS {result[step]['peak_rss_bytes'] / 2**30:.2f} GiB, "
                  f"{result[step]['seconds']:.0f} s")
    print(f"model: {weights / 2**30:.2f} GiB bf16 on disk, {params * 4 / 2**30:.2f} GiB in fp32")


if __name__ == "__main__":
    main()
