"""Size against quality, side by side: moec at several average expert bits and quantizers against
llama.cpp's k- and i-quants, plain and with an importance matrix, each as its total file size and
its perplexity rise over the same system's own full-precision build (moec's float artifact;
llama.cpp's F16 GGUF).

Every system scores the same token windows (the checkpoint's own tokenizer; llama.cpp is fed the
ids, not text), so the perplexities are comparable across systems. moec's plans come from
`moec calibrate --non-expert` on the calibration text and `moec plan --avg-bits B --no-top-widths --method M
--grid G --layer-prior-tokens P [--per-projection | --whole-budget | ...]` (QUANTIZERS names each combination),
with the default non-expert widths (attention 4, embedding and head 8), which --whole-budget trades
against the experts' at the same total size; compile quantizes GPTQ and weighted-grid experts with
the same text. llama.cpp's importance matrix comes from `llama-imatrix` on that text, from the tools
of the same llama.cpp (`--llama-tools`: a folder holding llama-imatrix and llama-quantize, built
from the llama-cpp-python sdist's vendor/llama.cpp with cmake).

    pip install -e ".[bench]"
    python bench/size_quality.py CHECKPOINT --data held-out.txt [--calibration FILE.txt]
        [--bits 2,2.5,3] [--quantizers rtn,gptq,gptq-weighted,gptq-weighted-prior,...] [--group-size 128]
        [--llama-tools BUILD/bin] [--workdir DIR] [--samples 16] [--plot FILE.png] [--json]

Run it on a trained checkpoint of dims llama.cpp's k-quants take whole (`python
samples/train_sample.py --hidden-size 256 --intermediate-size 512 --out DIR`) with the files it holds
out (`--data heldout` writes them to the work folder).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "samples"))

# name -> (plan method, grid, layer prior tokens, further `moec plan` options): each lever alone and
# together (docs/measurements.md); "squared" weighs experts by their squared loss alone (what the whole
# budget weighs every weight by), "whole" adds the non-expert widths to the budget
SPLIT, SQUARED, WHOLE = ("--per-projection",), ("--alpha", "0", "--beta", "0", "--gamma", "2"), ("--whole-budget",)
QUANTIZERS = {"rtn": ("rtn", "minmax", 0, ()), "rtn-weighted": ("rtn", "weighted", 0, ()),
              "gptq": ("gptq", "minmax", 0, ()), "gptq-weighted": ("gptq", "weighted", 0, ()),
              "gptq-prior": ("gptq", "minmax", 256, ()), "gptq-weighted-prior": ("gptq", "weighted", 256, ()),
              "gptq-split": ("gptq", "minmax", 0, SPLIT), "gptq-weighted-prior-split": ("gptq", "weighted", 256, SPLIT),
              "gptq-squared": ("gptq", "minmax", 0, SQUARED), "gptq-whole": ("gptq", "minmax", 0, WHOLE),
              "gptq-weighted-prior-squared": ("gptq", "weighted", 256, SQUARED),
              "gptq-weighted-prior-whole": ("gptq", "weighted", 256, WHOLE), "rtn-whole": ("rtn", "minmax", 0, WHOLE),
              "gptq-weighted-prior-split-whole": ("gptq", "weighted", 256, SPLIT + WHOLE)}
GGUF_TYPES = ("Q2_K", "Q3_K_S", "Q4_K_M")
IMATRIX_TYPES = ("IQ2_XS", "IQ3_XXS", "Q2_K", "Q3_K_S", "Q4_K_M")  # IQ2_XS needs one
LARGER = 1.15  # a moec build is compared with llama.cpp's builds of up to 15% more bytes


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


def moec_builds(checkpoint: Path, calibration: Path, bits: list[float], quantizers: list[str], group_size: int,
                work: Path, plan_options: tuple[str, ...] = ()) -> dict:
    """{"float": folder, (bits, quantizer): folder}, reusing folders compiled before."""
    stats = work / "stats.json"
    if not stats.is_file():
        moec_cli("calibrate", str(checkpoint), "--data", str(calibration), "--samples", "16", "--seq-len", "256",
                 "--group-size", str(group_size), "--non-expert", "--out", str(stats), "--quiet")
    builds = {"float": work / "moec-float"}
    if not (builds["float"] / "moec.json").is_file():
        moec_cli("compile", str(checkpoint), "--out", str(builds["float"]), "--force", "--quiet")
    for b in bits:
        for name in quantizers:
            method, grid, prior, options = QUANTIZERS[name]
            folder = builds[b, name] = work / f"moec-{b:g}bit-{name}"
            if (folder / "moec.json").is_file():
                continue
            plan = work / f"plan-{b:g}-{name}.json"
            moec_cli("plan", "--stats", str(stats), "--avg-bits", str(b), "--no-top-widths", "--group-size",
                     str(group_size), "--method", method, "--grid", grid, "--layer-prior-tokens", str(prior),
                     *options, *plan_options, "--out", str(plan))
            moec_cli("compile", str(checkpoint), "--plan", str(plan), "--data", str(calibration), "--out", str(folder),
                     "--force", "--quiet")
    return builds


def best_peer_rise(row: dict, rows: list[dict]) -> dict | None:
    """The llama.cpp row of least rise among those of equal or up to LARGER times the row's bytes."""
    peers = [r for r in rows
             if r["system"].startswith("llama.cpp") and row["bytes"] <= r["bytes"] <= LARGER * row["bytes"]]
    return min(peers, key=lambda r: r["relative_rise"], default=None)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    families = {}
    for row in rows:
        families.setdefault(row["family"], []).append(row)
    for family, members in families.items():
        members.sort(key=lambda r: r["bytes"])
        ax.plot([r["bytes"] / 2**20 for r in members], [100 * r["relative_rise"] for r in members], "o-", label=family)
    ax.set_xlabel("total MiB")
    ax.set_ylabel("perplexity rise over own full precision (%)")
    ax.axhline(0, color="grey", lw=0.5)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data", required=True,
                        help="text the perplexities are measured on; 'heldout': the sample trainer's held-out files")
    parser.add_argument("--calibration", type=Path, help="calibration text (default: moec's built-in corpus)")
    parser.add_argument("--bits", default="2,2.5,3", help="moec average expert bits (default 2,2.5,3)")
    parser.add_argument("--quantizers", default=",".join(QUANTIZERS), help=f"of {', '.join(QUANTIZERS)} (default all)")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--llama-tools", type=Path, help="folder with llama-imatrix and llama-quantize: adds the "
                        "importance-matrix quants")
    parser.add_argument("--no-llamacpp", action="store_true", help="moec's rows only")
    parser.add_argument("--no-protect-super-experts", action="store_true",
                        help="plan super experts like any other (a rotated checkpoint's are an artifact of its basis)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/moec-size-quality"))
    parser.add_argument("--samples", type=int, default=16, help="windows of --seq-len tokens")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plot", type=Path, help="write rise against size as a PNG")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from moec.evaluate import evaluate
    from moec.text import DEFAULT_CORPUS

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    data = Path(args.data)
    if args.data == "heldout":
        from train_sample import stdlib_sources

        data = work / "heldout.txt"
        data.write_text("\n".join(stdlib_sources(3_000_000)[1]))
    calibration = args.calibration or DEFAULT_CORPUS
    bits = [float(b) for b in args.bits.split(",")]
    quantizers = args.quantizers.split(",")
    builds = moec_builds(args.checkpoint, calibration, bits, quantizers, args.group_size, work,
                         ("--no-protect-super-experts",) if args.no_protect_super_experts else ())
    ids = windows(args.checkpoint, data, args.samples, args.seq_len)
    rows = []
    start = time.perf_counter()
    score = lambda folder: evaluate(folder, data, samples=args.samples, seq_len=args.seq_len,  # noqa: E731
                                    threads=args.threads)["perplexity"]
    moec_base = score(builds["float"])
    baselines = {"moec float": moec_base, "moec float bytes": folder_bytes(builds["float"])}
    for b in bits:
        for name in quantizers:
            rows.append({"system": f"moec {b:g}-bit {name}", "family": f"moec {name}",
                         "bytes": folder_bytes(builds[b, name]), "perplexity": score(builds[b, name]),
                         "baseline": moec_base})
    if not args.no_llamacpp:
        import llamacpp

        ggufs = llamacpp.gguf_files(args.checkpoint, work / "gguf", GGUF_TYPES)
        imatrix = llamacpp.imatrix_ggufs(ggufs["F16"], args.llama_tools, calibration, work / "gguf",
                                         IMATRIX_TYPES) if args.llama_tools else {}
        llama_base = llamacpp_perplexity(ggufs["F16"], ids, args.threads)
        baselines |= {"llama.cpp F16": llama_base, "llama.cpp F16 bytes": ggufs["F16"].stat().st_size}
        for family, files in (("llama.cpp", {k: ggufs[k] for k in GGUF_TYPES}), ("llama.cpp + imatrix", imatrix)):
            for kind, gguf in files.items():
                rows.append({"system": f"{family} {kind}", "family": family, "bytes": gguf.stat().st_size,
                             "perplexity": llamacpp_perplexity(gguf, ids, args.threads), "baseline": llama_base})
    for row in rows:
        row["rise"] = row["perplexity"] - row["baseline"]
        row["relative_rise"] = row["rise"] / row["baseline"]
    for row in rows:
        if row["system"].startswith("moec") and (peer := best_peer_rise(row, rows)) is not None:
            row["best_llamacpp_peer"] = peer["system"]
            row["rise_vs_peer"] = row["relative_rise"] / peer["relative_rise"] if peer["relative_rise"] > 0 else None
    result = {"checkpoint": str(args.checkpoint), "data": str(data), "calibration": str(calibration),
              "tokens": int(ids.size - len(ids)), "group_size": args.group_size, "baselines": baselines, "rows": rows,
              "seconds": time.perf_counter() - start}
    (work / "results.json").write_text(json.dumps(result, indent=1))
    if args.plot:
        plot(rows, args.plot)
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"{args.checkpoint} on {data}: {result['tokens']} scored tokens; group {args.group_size}; baselines "
          + ", ".join(f"{k} {v:.3f}" for k, v in baselines.items() if "bytes" not in k) + "\n")
    print("| system | total MiB | perplexity | rise over own baseline | best llama.cpp of equal or up to 15% more bytes"
          " | rise ratio |\n|---|---|---|---|---|---|")
    for row in sorted(rows, key=lambda r: r["bytes"]):
        ratio = row.get("rise_vs_peer")
        print(f"| {row['system']} | {row['bytes'] / 2**20:.2f} | {row['perplexity']:.3f} | "
              f"{row['rise']:+.3f} ({row['relative_rise']:+.2%}) | {row.get('best_llamacpp_peer', '')} | "
              f"{'' if ratio is None else f'{ratio:.2f}'} |")


if __name__ == "__main__":
    main()
