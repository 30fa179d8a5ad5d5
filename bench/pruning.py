"""Dynamic pruning, measured: perplexity against pruned fraction on the sample, and decode speed
with pruning on and off on the Mixtral-proportioned random model.

1. The sample (float weights, so only pruning moves perplexity): calibrate, then for each
   --targets value plan the pruning (`moec plan --prune-target`), compile, and evaluate on the
   sample's held-out standard-library files: pruned fraction (counted by the artifact) and
   perplexity next to the unpruned model.
2. The 8-layer Mixtral-proportioned checkpoint of bench/memory.py (built if absent): calibrate,
   plan 2.5 average expert bits with --decode-target pruning, compile, then greedy decoding of
   --decode-tokens tokens after a short prompt, with the artifact's pruning on and off (the same
   file, its prune_experts switch), best of --repeats, one thread and two.

Run from the repository root: python bench/pruning.py [--workdir /tmp/moec-pruning] [--skip-sample]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "samples"))
sys.path.insert(0, str(ROOT / "bench"))

import moec  # noqa: E402
from moec.calibrate import calibrate  # noqa: E402
from moec.evaluate import evaluate  # noqa: E402
from moec.planner import DEFAULT_NON_EXPERT, load_stats, make_plan, save_plan  # noqa: E402
from moec.pruning import plan_pruning  # noqa: E402
from moec.runtime import Artifact, generate  # noqa: E402

SAMPLE = ROOT / "samples" / "tiny-mixtral"


def float_plan(stats: dict, pruning: dict) -> dict:
    """Every weight in float (width 16), so perplexity moves with pruning alone."""
    layers, experts = stats["model"]["num_layers"], stats["model"]["num_experts"]
    moe = {layer["layer"] for layer in stats["layers"]}
    return {"format": "moec-plan/1", "model": stats["model"]["name_or_path"],
            "experts": {"bits": [[16] * experts if i in moe else None for i in range(layers)]},
            "non_expert": {key: 16 for key in DEFAULT_NON_EXPERT},
            "quantization": {"method": "rtn", "group_size": 32}, "pruning": pruning}


def sample_curve(work: Path, targets: list[float]) -> list[dict]:
    from train_sample import stdlib_sources

    heldout = work / "heldout.txt"
    heldout.write_text("\n".join(stdlib_sources(3_000_000)[1]))
    stats = calibrate(SAMPLE, progress=False)
    rows = [{"target": 0.0, "layers": [], **_eval(SAMPLE, heldout)}]
    for target in targets:
        plan = float_plan(stats, plan_pruning(stats, target))
        save_plan(plan, work / f"plan-{target}.json")
        artifact = work / f"sample-{target}"
        moec.compile(SAMPLE, artifact, plan=work / f"plan-{target}.json", force=True, progress=False)
        rows.append({"target": target, "layers": [(e["layer"], e["beta"]) for e in plan["pruning"]["layers"]],
                     "predicted": plan["pruning"]["predicted_pruned_fraction"], **_eval(artifact, heldout)})
        print(rows[-1], flush=True)
    return rows


def _eval(path: Path, data: Path) -> dict:
    result = evaluate(path, data)
    return {"perplexity": result["perplexity"], "pruned_fraction": result.get("pruned_fraction", 0.0)}


def decode_speed(artifact: Path, tokens: int, repeats: int, threads: int, prune: bool) -> dict:
    session = Artifact(artifact, threads=threads, prune=prune)
    prompt = [list(np.random.default_rng(0).integers(0, 32000, 16))]
    best = np.inf
    for _ in range(repeats):
        session.activations = {"computed": 0, "top_k": 0}
        steps = generate(session, prompt, tokens)
        next(steps)  # prefill, not timed
        start = time.perf_counter()
        count = sum(1 for _ in steps)
        best = min(best, (time.perf_counter() - start) / count)
    activations = session.activations
    return {"tokens_per_second": 1.0 / best, "pruned_fraction": 1 - activations["computed"] / activations["top_k"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/moec-pruning", type=Path)
    parser.add_argument("--targets", default="0.05,0.1,0.13,0.15,0.2,0.3")
    parser.add_argument("--skip-sample", action="store_true")
    parser.add_argument("--big", default="/tmp/moec-bench/mixtral-8L-h1024", type=Path)
    parser.add_argument("--decode-target", default=0.2, type=float)
    parser.add_argument("--decode-tokens", default=64, type=int)
    parser.add_argument("--repeats", default=3, type=int)
    args = parser.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    result = {}
    if not args.skip_sample:
        result["sample"] = sample_curve(work, [float(t) for t in args.targets.split(",")])
        base = result["sample"][0]["perplexity"]
        print("\n| target | layers (beta) | pruned fraction | perplexity | change |\n|---|---|---|---|---|")
        for row in result["sample"]:
            print(f"| {row['target']:g} | {row['layers']} | {row['pruned_fraction']:.4f} | {row['perplexity']:.3f} | "
                  f"{(row['perplexity'] / base - 1) * 100:+.2f}% |")
    if not (args.big / "config.json").is_file():
        import subprocess

        subprocess.run([sys.executable, str(ROOT / "bench" / "memory.py"), "--build", str(args.big)], check=True)
    stats_file = work / "big-stats.json"
    if not stats_file.is_file():
        stats_file.write_text(json.dumps(calibrate(args.big, samples=32, progress=False)))
    stats = load_stats(stats_file)
    plan = make_plan(stats, avg_bits=2.5, bits=[2, 4, 8], require_top_widths=False, model=str(args.big))
    plan["pruning"] = plan_pruning(stats, args.decode_target)
    save_plan(plan, work / "big-plan.json")
    artifact = work / "big-artifact"
    moec.compile(args.big, artifact, plan=work / "big-plan.json", force=True, progress=False)
    result["decode"] = {"plan_pruning": plan["pruning"], "runs": []}
    for threads in (1, 2):
        for prune in (False, True):
            run = {"threads": threads, "prune": prune,
                   **decode_speed(artifact, args.decode_tokens, args.repeats, threads, prune)}
            result["decode"]["runs"].append(run)
            print(run, flush=True)
    (work / "result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
