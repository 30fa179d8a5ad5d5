"""Size against quality, side by side: moec at 2.5 and 3 average expert bits against llama.cpp's
Q2_K, Q3_K_S and Q4_K_M, each as its total file size and its perplexity rise over the same
system's own full-precision build (moec's float artifact; llama.cpp's F16 GGUF).

Every system scores the same token windows (the checkpoint's own tokenizer; llama.cpp is fed the
ids, not text), so the perplexities are comparable across systems. moec's plans come from
`moec calibrate` on the built-in corpus and `moec plan --avg-bits B --no-top-widths`, with the
default non-expert widths (attention 4, embedding and head 8).

    pip install -e ".[bench]"
    python bench/size_quality.py CHECKPOINT --data held-out.txt [--workdir DIR] [--samples 16] [--json]

Run it on the trained checkpoint `python samples/train_sample.py --hidden-size 256
--intermediate-size 512 --out DIR` writes (dims llama.cpp's k-quants take whole) with the files it
holds out, and on bench/compare.py's Mixtral-proportioned random model (whose perplexity is near
the vocabulary size: there the rise only measures how far each build strays).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

MOEC_BITS = (2.5, 3)
GGUF_TYPES = ("Q2_K", "Q3_K_S", "Q4_K_M")


def windows(model_dir: Path, data: Path, samples: int, seq_len: int) -> np.ndarray:
    from moec.runtime import Tokenizer
    from moec.text import read_text, token_windows

    return token_windows(Tokenizer(model_dir).encode(read_text(data)[0]), samples, seq_len)


def llamacpp_perplexity(gguf: Path, ids: np.ndarray, threads: int) -> float:
    """exp(mean NLL) of each window's next tokens, one window at a time from an empty cache."""
    from llama_cpp import Llama

    llm = Llama(str(gguf), n_ctx=ids.shape[1], logits_all=True, n_threads=threads, n_batch=ids.shape[1],
                verbose=False)
    nll, count = 0.0, 0
    for window in ids:
        llm.reset()
        llm.eval([int(t) for t in window])
        logits = np.asarray(llm.scores[: len(window) - 1], np.float64)
        top = logits.max(-1, keepdims=True)
        log_z = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
        nll += float((log_z - logits[np.arange(len(window) - 1), window[1:]]).sum())
        count += len(window) - 1
    return float(np.exp(nll / count))


def moec_cli(*argv: str) -> None:
    subprocess.run([sys.executable, "-m", "moec", *argv], check=True, stdout=subprocess.DEVNULL)


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith("model.onnx"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data", required=True, type=Path, help="text the perplexities are measured on")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/moec-size-quality"))
    parser.add_argument("--samples", type=int, default=16, help="windows of --seq-len tokens")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import llamacpp

    from moec.evaluate import evaluate

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    stats = work / "stats.json"
    if not stats.is_file():
        moec_cli("calibrate", str(args.checkpoint), "--samples", "16", "--seq-len", "256", "--out", str(stats),
                 "--quiet")
    builds = {"float": work / "moec-float"}
    if not (builds["float"] / "moec.json").is_file():
        moec_cli("compile", str(args.checkpoint), "--out", str(builds["float"]), "--force", "--quiet")
    for bits in MOEC_BITS:
        builds[bits] = work / f"moec-{bits:g}bit"
        if not (builds[bits] / "moec.json").is_file():
            plan = work / f"plan-{bits:g}.json"
            moec_cli("plan", "--stats", str(stats), "--avg-bits", str(bits), "--no-top-widths", "--out", str(plan))
            moec_cli("compile", str(args.checkpoint), "--plan", str(plan), "--out", str(builds[bits]), "--force",
                     "--quiet")
    ggufs = llamacpp.gguf_files(args.checkpoint, work / "gguf", GGUF_TYPES)
    ids = windows(args.checkpoint, args.data, args.samples, args.seq_len)
    rows = []
    start = time.perf_counter()
    moec_base = evaluate(builds["float"], args.data, samples=args.samples, seq_len=args.seq_len,
                         threads=args.threads)["perplexity"]
    for bits in MOEC_BITS:
        ppl = evaluate(builds[bits], args.data, samples=args.samples, seq_len=args.seq_len,
                       threads=args.threads)["perplexity"]
        rows.append({"system": f"moec {bits:g}-bit", "bytes": folder_bytes(builds[bits]), "perplexity": ppl,
                     "baseline": moec_base})
    llama_base = llamacpp_perplexity(ggufs["F16"], ids, args.threads)
    for kind in GGUF_TYPES:
        rows.append({"system": f"llama.cpp {kind}", "bytes": ggufs[kind].stat().st_size,
                     "perplexity": llamacpp_perplexity(ggufs[kind], ids, args.threads), "baseline": llama_base})
    for row in rows:
        row["rise"] = row["perplexity"] - row["baseline"]
        row["relative_rise"] = row["rise"] / row["baseline"]
    result = {"checkpoint": str(args.checkpoint), "data": str(args.data), "tokens": int(ids.size - len(ids)),
              "baselines": {"moec float": moec_base, "llama.cpp F16": llama_base,
                            "moec float bytes": folder_bytes(builds["float"]),
                            "llama.cpp F16 bytes": ggufs["F16"].stat().st_size},
              "rows": rows, "seconds": time.perf_counter() - start}
    (work / "results.json").write_text(json.dumps(result, indent=1))
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"{args.checkpoint} on {args.data}: {result['tokens']} scored tokens; baselines moec float "
          f"{moec_base:.3f}, llama.cpp F16 {llama_base:.3f}\n")
    print("| system | total MiB | perplexity | rise over own baseline |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['system']} | {row['bytes'] / 2**20:.1f} | {row['perplexity']:.3f} | "
              f"{row['rise']:+.3f} ({row['relative_rise']:+.1%}) |")


if __name__ == "__main__":
    main()
