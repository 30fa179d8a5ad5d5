"""Beyond MC-MoE, measured on the sample: super experts, the top-p pruning rule, expert dropping.

Every number is the perplexity of a compiled artifact (onnxruntime, exact kernels off: what ships)
on the sample's held-out standard-library files, with the non-expert weights in float so that
only what the experts do moves it.

1. Super experts. A super expert is planted in the sample: one expert's down projection scaled by
   --scale, so its outputs are massive. Perplexity of the sample, of the planted model, and of the
   planted model with that expert dropped (so its tokens go to other experts) shows the model now
   depends on it. `moec calibrate` on the planted model must name it; then at 2.5 average expert
   bits, perplexity with the protection (highest width, never pruned) and without, each with and
   without dynamic pruning of --prune-target of the expert activations (beta rule). The planted
   model did not learn to use its super expert (it has a higher perplexity than the sample), so
   damaging it can lower perplexity; each row also gives how far the artifact is from the planted
   model itself: the mean KL divergence of its next-token distribution from the planted float
   artifact's, and how often their top-1 tokens agree.
2. Top-p routing. On the sample, for each --targets value, pruning planned by the beta rule and by
   the top-p rule: the pruned fraction the artifact counts and its perplexity.
3. Expert dropping. On the sample, plans of 2.0 and 2.5 average expert bits from widths {2,4,8}
   and from {0,2,4,8} (0: dropped), under the same byte budget: experts dropped, expert bytes,
   perplexity; with the planner's default loss exponent (MC-MoE's, 1) and with 2 (squared errors,
   which add like independent noise).

Run from the repository root:
    python bench/beyond.py [--workdir /tmp/moec-beyond] [--json FILE]
"""

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "samples"))

import moec  # noqa: E402
from moec.calibrate import calibrate  # noqa: E402
from moec.evaluate import evaluate  # noqa: E402
from moec.planner import DEFAULT_NON_EXPERT, make_plan, save_plan  # noqa: E402
from moec.pruning import plan_pruning  # noqa: E402

SAMPLE = ROOT / "samples" / "tiny-mixtral"
PLANTED_LAYER = 1  # in the first three quarters of the sample's 4 layers, where super experts are looked for
FIDELITY_WINDOWS = 16


def heldout_windows(heldout: Path, count: int) -> np.ndarray:
    from moec.runtime import Tokenizer
    from moec.text import read_text, token_windows

    return token_windows(Tokenizer(SAMPLE).encode(read_text(heldout)[0]), count, 256)


def isa_flags() -> str:
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    return " ".join(sorted({f for f in flags if f.startswith("avx512") or f in ("avx2", "avx_vnni")})) or "none"


def plan_for(stats: dict, model: Path, avg_bits: float | None, bits=(2, 4, 8), protect: bool = True,
             pruning: dict | None = None, gamma: float | None = None) -> dict:
    """A plan for `model`: the experts at `avg_bits` from `bits` (None: all in float), non-expert
    weights in float."""
    plan = make_plan(stats, avg_bits=avg_bits or 4.0, bits=list(bits), group_size=32, require_top_widths=False,
                     protect_super_experts=protect, model=str(model), gamma=gamma)
    if avg_bits is None:
        plan["experts"]["bits"] = [None if row is None else ["float"] * len(row) for row in plan["experts"]["bits"]]
    plan["non_expert"] = {key: "float" for key in DEFAULT_NON_EXPERT}
    plan["pruning"] = pruning or {}
    return plan


def next_token_logits(artifact: Path, windows: np.ndarray) -> np.ndarray:
    """The artifact's logits [windows, L, V] on token windows, a window at a time."""
    from moec.runtime import Artifact

    session = Artifact(artifact)
    positions = np.arange(windows.shape[1])[None]
    return np.stack([session.forward(w[None], np.ones_like(w[None]), positions, session.empty_cache(1))[0][0]
                     for w in windows])


def fidelity(logits: np.ndarray, reference: np.ndarray) -> dict:
    """Mean KL(reference || artifact) of the next-token distributions, and top-1 agreement."""
    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    ref, got = log_softmax(reference.astype(np.float64)), log_softmax(logits.astype(np.float64))
    return {"kl_to_reference": round(float((np.exp(ref) * (ref - got)).sum(-1).mean()), 5),
            "top1_agreement": round(float((ref.argmax(-1) == got.argmax(-1)).mean()), 4)}


def measure(model: Path, plan: dict, work: Path, name: str, heldout: Path, reference=None) -> dict:
    """Compile `plan` and evaluate the artifact (and, given (windows, logits) of a reference
    artifact, its fidelity to it)."""
    save_plan(plan, work / f"{name}.json")
    artifact = work / name
    record = moec.compile(model, artifact, plan=work / f"{name}.json", force=True, progress=False)
    result = evaluate(artifact, heldout)
    row = {"perplexity": round(result["perplexity"], 4),
           "pruned_fraction": round(result.get("pruned_fraction", 0.0), 4),
           "expert_bytes": record["quantization"]["expert_bytes"], "total_bytes": record["bytes"]["total"],
           "dropped_experts": len(record["dropped_experts"]), "verified": record["verification"]["max_abs_logit_diff"]}
    if reference is not None:
        windows, logits = reference
        row |= fidelity(next_token_logits(artifact, windows), logits)
    print(name, row, flush=True)
    return row


def plant(source: Path, target: Path, layer: int, expert: int, scale: float) -> None:
    """A copy of the sample with one expert's down projection (Mixtral's w2) scaled."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target, dirs_exist_ok=True)
    tensors = load_file(source / "model.safetensors")
    name = f"model.layers.{layer}.block_sparse_moe.experts.{expert}.w2.weight"
    tensors[name] = (tensors[name].float() * scale).to(torch.bfloat16)
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})


def super_experts(stats: dict, work: Path, heldout: Path, scale: float, target: float) -> dict:
    # the planted one: the layer's most used expert, so that its tokens are many
    frequency = [e["frequency"] for e in stats["layers"][PLANTED_LAYER]["experts"]]
    expert = max(range(len(frequency)), key=frequency.__getitem__)
    planted = work / "planted"
    plant(SAMPLE, planted, PLANTED_LAYER, expert, scale)
    planted_stats = calibrate(planted, bits=(0, 2, 4, 8), progress=False)
    (work / "planted-stats.json").write_text(json.dumps(planted_stats))
    peaks = sorted((e["max_down_output"], layer["layer"], i) for layer in planted_stats["layers"]
                   for i, e in enumerate(layer["experts"]))
    report = {"planted": [PLANTED_LAYER, expert], "scale": scale, "found": planted_stats["super_experts"],
              "largest_max_down_output": peaks[-1][0], "second_max_down_output": peaks[-2][0],
              "sample_super_experts": stats["super_experts"]}
    print(report, flush=True)
    dropped = plan_for(planted_stats, planted, None, protect=False)
    dropped["experts"]["bits"][PLANTED_LAYER][expert] = 0
    report["float"] = {"sample": measure(SAMPLE, plan_for(stats, SAMPLE, None), work, "sample-float", heldout),
                       "planted": measure(planted, plan_for(planted_stats, planted, None), work, "planted-float",
                                          heldout)}
    windows = heldout_windows(heldout, FIDELITY_WINDOWS)
    reference = windows, next_token_logits(work / "planted-float", windows)
    report["float"]["planted, super expert dropped"] = measure(planted, dropped, work, "planted-dropped", heldout,
                                                               reference)
    pruning = plan_pruning(planted_stats, target)
    report["2.5 bits"] = {}
    for protect in (True, False):
        for pruned in (False, True):
            plan = plan_for(planted_stats, planted, 2.5, protect=protect, pruning=pruning if pruned else None)
            name = f"planted-2.5-{'protected' if protect else 'unprotected'}{'-pruned' if pruned else ''}"
            row = measure(planted, plan, work, name, heldout, reference)
            row["super_expert_bits"] = plan["experts"]["bits"][PLANTED_LAYER][expert]
            report["2.5 bits"][name] = row
    return report


def top_p_curve(stats: dict, work: Path, heldout: Path, targets: list[float]) -> list[dict]:
    unpruned = measure(SAMPLE, plan_for(stats, SAMPLE, None), work, "curve-none", heldout)
    rows = [{"rule": "none", "target": 0.0, **unpruned}]
    for target in targets:
        for rule in ("beta", "top_p"):
            pruning = plan_pruning(stats, target, rule=rule)
            row = measure(SAMPLE, plan_for(stats, SAMPLE, None, protect=False, pruning=pruning), work,
                          f"curve-{rule}-{target}", heldout)
            rows.append({"rule": rule, "target": target, "predicted": pruning["predicted_pruned_fraction"],
                         "thresholds": [entry[rule] for entry in pruning["layers"]], **row})
    return rows


def dropping(stats: dict, work: Path, heldout: Path) -> list[dict]:
    rows = []
    for gamma in (None, 2.0):
        for avg_bits in (2.0, 2.5):
            for bits in ((2, 4, 8), (0, 2, 4, 8)):
                plan = plan_for(stats, SAMPLE, avg_bits, bits=bits, protect=False, gamma=gamma)
                name = f"drop-{avg_bits}-{''.join(map(str, bits))}-loss-exponent-{gamma or 1}"
                row = measure(SAMPLE, plan, work, name, heldout)
                rows.append({"loss_exponent": gamma or 1.0, "avg_bits": avg_bits, "bits": list(bits),
                             "predicted_loss": plan["objective"]["predicted_loss"],
                             "widths": plan["experts"]["bits"], **row})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/moec-beyond"))
    parser.add_argument("--scale", type=float, default=20.0, help="the planted expert's down projection factor")
    parser.add_argument("--prune-target", type=float, default=0.15)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.05, 0.1, 0.15, 0.25, 0.35])
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    from train_sample import stdlib_sources

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    heldout = work / "heldout.txt"
    heldout.write_text("\n".join(stdlib_sources(3_000_000)[1]))
    start = time.perf_counter()
    print(f"CPU ISA flags: {isa_flags()}; {platform.processor() or platform.machine()}", flush=True)
    stats = calibrate(SAMPLE, bits=(0, 2, 4, 8), progress=False)
    (work / "sample-stats.json").write_text(json.dumps(stats))
    results = {"isa": isa_flags(),
               "super_experts": super_experts(stats, work, heldout, args.scale, args.prune_target),
               "top_p": top_p_curve(stats, work, heldout, args.targets),
               "dropping": dropping(stats, work, heldout)}
    results["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
