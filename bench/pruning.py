"""Dynamic pruning, measured: perplexity against pruned fraction on the sample, and decode speed
with pruning on and off on the Mixtral-proportioned random model.

1. The sample (float weights, so only pruning moves perplexity): calibrate, then for each
   --targets value plan the pruning (`moec plan --prune-target`), compile, and evaluate on the
   sample's held-out standard-library files: pruned fraction (counted by the artifact) and
   perplexity next to the unpruned model.
   Then the renormalization study: at each target's betas, perplexity with the kept routing
   weights left as the router gave them and scaled back to the token's top-k weight sum.
   And the importance study: at the 0.15 target, perplexity (PyTorch, the op's NumPy
   reference in the pruned layers) with no token protected, with the 10% / 20% most important
   tokens protected by the artifact's proxy (L1 norm of the MoE input), and by the paper's score
   (attention the token receives, mean over heads and queries, times the L1 norm of the layer's
   input), the betas re-planned for each so the pruned fraction stays at the target.
2. The 8-layer Mixtral-proportioned checkpoint of bench/memory.py (built if absent): calibrate,
   plan 2.5 average expert bits with --decode-target pruning, compile, then greedy decoding of
   --decode-tokens tokens after a short prompt, with the artifact's pruning on and off (the same
   file, its prune_experts switch), one thread and two, off and on alternating over --rounds
   rounds (each the best of --repeats); the median per setting is reported.

Run from the repository root:
    python bench/pruning.py [--workdir /tmp/moec-pruning] [--skip-sample] [--reuse-artifact]
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
            "experts": {"bits": [["float"] * experts if i in moe else None for i in range(layers)]},
            "non_expert": {key: "float" for key in DEFAULT_NON_EXPERT},
            "quantization": {"method": "rtn", "group_size": 32}, "pruning": pruning}


def sample_curve(work: Path, targets: list[float]) -> list[dict]:
    from train_sample import stdlib_sources

    heldout = work / "heldout.txt"
    heldout.write_text("\n".join(stdlib_sources(3_000_000)[1]))
    stats = calibrate(SAMPLE, progress=False)
    (work / "sample-stats.json").write_text(json.dumps(stats))
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


def _perplexity_with_pruning(windows: np.ndarray, pruning: dict, attention_importance: bool = False,
                              renormalize: bool | None = None) -> float:
    """The sample's perplexity in PyTorch, its experts run by the Experts op's NumPy reference
    pruning as `pruning` ({layer: {"beta": beta, "protect_fraction": p}}) says; importance by the artifact's
    proxy or by the paper's attention score; kept weights renormalized as the op does, unless
    `renormalize` says otherwise."""
    import functools

    import torch
    import transformers

    import moec.ops.dynamic_gating as gating
    from moec.evaluate import _nll
    from moec.experts import REFERENCE_IMPLEMENTATION, experts_layers, set_implementation
    from moec.reference import configure_experts

    model = transformers.AutoModelForCausalLM.from_pretrained(SAMPLE, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    set_implementation(model, REFERENCE_IMPLEMENTATION)
    configure_experts(model, experts_layers(model), {}, pruning)
    attention_score = {}

    def remember_input(module, args, kwargs):
        attention_score["input"] = kwargs["hidden_states"]

    def score_tokens(module, args, kwargs, output):
        received = output[1].mean(dim=(1, 2))  # attention probabilities [B, heads, Tq, Tk]
        attention_score["value"] = (received * attention_score["input"].abs().sum(-1)).reshape(-1).numpy()

    for layer in model.model.layers:
        layer.self_attn.register_forward_pre_hook(remember_input, with_kwargs=True)
        layer.self_attn.register_forward_hook(score_tokens, with_kwargs=True)
    proxy, rule = gating.importance, gating.prune
    if attention_importance:
        gating.importance = lambda hidden: attention_score["value"]
    gating.prune = functools.partial(rule, renormalize=gating.RENORMALIZE if renormalize is None else renormalize)
    try:
        with torch.no_grad():
            nll = sum(_nll(model(torch.from_numpy(chunk), output_attentions=attention_importance).logits.numpy(), chunk)
                      for chunk in np.array_split(windows, 8))
    finally:
        gating.importance, gating.prune = proxy, rule
    return float(np.exp(nll / (windows.shape[0] * (windows.shape[1] - 1))))


def _heldout_windows(heldout: Path) -> np.ndarray:
    from moec.runtime import Tokenizer
    from moec.text import read_text, token_windows

    return token_windows(Tokenizer(SAMPLE).encode(read_text(heldout)[0]), 32, 256)


def importance_study(stats: dict, heldout: Path, target: float = 0.15) -> list[dict]:
    """Perplexity at the target with no token protected, and with the most important tokens
    protected by the artifact's proxy or the paper's attention score (betas re-planned for each)."""
    windows, rows = _heldout_windows(heldout), []
    for protect, score in ((0.0, "none"), (0.1, "proxy"), (0.2, "proxy"), (0.1, "attention"), (0.2, "attention")):
        pruning = plan_pruning(stats, target, protect)
        layers = {entry["layer"]: {"beta": entry["beta"], "protect_fraction": protect} for entry in pruning["layers"]}
        rows.append({"protect_fraction": protect, "importance": score,
                     "predicted_pruned_fraction": pruning["predicted_pruned_fraction"],
                     "perplexity": _perplexity_with_pruning(windows, layers, score == "attention")})
        print(rows[-1], flush=True)
    return rows


def renormalization_study(stats: dict, heldout: Path, targets=(0.1, 0.15, 0.25, 0.35)) -> list[dict]:
    """Perplexity at each target's betas (the same pruned fraction) with the kept weights left as
    the router gave them and scaled back to the token's top-k sum (what DynamicGating does)."""
    windows, rows = _heldout_windows(heldout), []
    for target in targets:
        pruning = plan_pruning(stats, target)
        layers = {entry["layer"]: {"beta": entry["beta"]} for entry in pruning["layers"]}
        rows.append({"target": target, "predicted_pruned_fraction": pruning["predicted_pruned_fraction"],
                     "left_as_routed": _perplexity_with_pruning(windows, layers, renormalize=False),
                     "renormalized": _perplexity_with_pruning(windows, layers, renormalize=True)})
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


def build_big(args, work: Path, artifact: Path) -> None:
    """Calibrate (once), plan 2.5 bits with pruning, and compile the Mixtral-proportioned model."""
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
    moec.compile(args.big, artifact, plan=work / "big-plan.json", force=True, progress=False)


def decode_rounds(artifact: Path, args) -> list[dict]:
    """Decode speed with pruning off and on, alternating over rounds (so drifting machine load
    hits both), for one thread and two; the median of the rounds is printed."""
    import statistics

    speeds: dict = {}
    for _ in range(args.rounds):
        for threads in (1, 2):
            for prune in (False, True):
                run = decode_speed(artifact, args.decode_tokens, args.repeats, threads, prune)
                speeds.setdefault((threads, prune), []).append(run)
    rows = []
    for (threads, prune), runs in speeds.items():
        rows.append({"threads": threads, "prune": prune, "pruned_fraction": runs[0]["pruned_fraction"],
                     "median_tokens_per_second": statistics.median(r["tokens_per_second"] for r in runs),
                     "tokens_per_second": [r["tokens_per_second"] for r in runs]})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/moec-pruning", type=Path)
    parser.add_argument("--targets", default="0.05,0.1,0.13,0.15,0.2,0.3")
    parser.add_argument("--skip-sample", action="store_true")
    parser.add_argument("--sample-only", action="store_true", help="stop after the sample's studies")
    parser.add_argument("--big", default="/tmp/moec-bench/mixtral-8L-h1024", type=Path)
    parser.add_argument("--decode-target", default=0.2, type=float)
    parser.add_argument("--decode-tokens", default=256, type=int)
    parser.add_argument("--repeats", default=2, type=int, help="best of this many per round")
    parser.add_argument("--rounds", default=4, type=int)
    parser.add_argument("--reuse-artifact", action="store_true", help="decode with WORKDIR/big-artifact as it is")
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
        result["importance"] = importance_study(json.loads((work / "sample-stats.json").read_text()),
                                                work / "heldout.txt")
        result["renormalization"] = renormalization_study(json.loads((work / "sample-stats.json").read_text()),
                                                          work / "heldout.txt")
    if args.sample_only:
        (work / "result.json").write_text(json.dumps(result, indent=1))
        return
    artifact = work / "big-artifact"
    if not (args.reuse_artifact and (artifact / "moec.json").is_file()):
        build_big(args, work, artifact)
    plan = json.loads((work / "big-plan.json").read_text())
    result["decode"] = {"plan_pruning": plan["pruning"], "runs": decode_rounds(artifact, args)}
    (work / "result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
