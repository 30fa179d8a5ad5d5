"""The whole compression pipeline on the sample checkpoint, measured.

calibrate → plan (global and per-layer, 2.5 and 3.0 average expert bits, widths 2/4/8; the paper's
one-expert-at-each-top-width rule is off, since with 2/4/8 it alone needs 3.0 bits per layer, and so
is the super-expert protection, which MC-MoE does not have: an expert at 8 bits needs 2.75 per layer) →
compile (RTN and GPTQ) → perplexity on the sample's held-out standard-library files, next to the float model,
uniform 2/4/8-bit plans and the planned widths shuffled within each layer (same bytes).
Run from the repository root: python bench/sample_pipeline.py [--workdir /tmp/moec-sample]
"""

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "samples"))

import moec  # noqa: E402
from moec.calibrate import calibrate  # noqa: E402
from moec.evaluate import evaluate  # noqa: E402
from moec.planner import make_plan, save_plan  # noqa: E402
from train_sample import stdlib_sources  # noqa: E402

SAMPLE = ROOT / "samples" / "tiny-mixtral"
GROUP = 32  # the sample's expert width, 160, is a multiple of 32, not of 128


def uniform(plan: dict, bits: int) -> dict:
    plan = copy.deepcopy(plan)
    plan["experts"]["bits"] = [None if row is None else [bits] * len(row) for row in plan["experts"]["bits"]]
    plan.pop("objective", None)
    return plan


def shuffled(plan: dict, seed: int = 0) -> dict:
    """The same widths (same bytes) given to other experts of the same layer."""
    rng = np.random.default_rng(seed)
    plan = copy.deepcopy(plan)
    plan["experts"]["bits"] = [None if row is None else [int(b) for b in rng.permutation(row)]
                               for row in plan["experts"]["bits"]]
    plan.pop("objective", None)
    return plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/moec-sample", type=Path)
    args = parser.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    heldout = work / "heldout.txt"
    heldout.write_text("\n".join(stdlib_sources(3_000_000)[1]))

    start = time.perf_counter()
    stats = calibrate(SAMPLE, progress=False)
    calibrate_s = time.perf_counter() - start
    (work / "stats.json").write_text(json.dumps(stats))

    plans = {}
    for avg in (2.5, 3.0):
        for scope in ("global", "layer"):
            plans[f"planned {avg} ({scope})"] = make_plan(stats, avg_bits=avg, bits=[2, 4, 8], scope=scope,
                                                         group_size=GROUP, model=str(SAMPLE),
                                                         require_top_widths=False, protect_super_experts=False)
    print(f"calibrate on the sample: {calibrate_s:.1f} s ({stats['calibration']['samples']} x "
          f"{stats['calibration']['seq_len']} tokens)")
    for name, plan in plans.items():
        print(f"{name}: predicted loss {plan['objective']['predicted_loss']:.4f}, "
              f"expert bytes {plan['objective']['predicted_expert_bytes']}")
    base = plans["planned 2.5 (global)"]
    plans |= {f"uniform {b}": uniform(base, b) for b in (2, 4, 8)}
    plans["shuffled 2.5 (global)"] = shuffled(base)

    rows = [("float", None, {"-": evaluate(SAMPLE, heldout)["perplexity"]}, None, None, None)]
    for name, plan in plans.items():
        perplexity = {}
        for method in ("rtn", "gptq"):
            plan = copy.deepcopy(plan)
            plan["quantization"]["method"] = method
            stem = f"{name.replace(' ', '_').replace('(', '').replace(')', '')}-{method}"
            save_plan(plan, work / f"{stem}.json")
            record = moec.compile(SAMPLE, work / stem, plan=work / f"{stem}.json", force=True, progress=False)
            perplexity[method] = evaluate(work / stem, heldout)["perplexity"]
        q = record["quantization"]
        predicted = (plan.get("objective") or {}).get("predicted_expert_bytes")
        rows.append((name, q["avg_expert_bits"], perplexity, q["expert_bytes"], predicted, record["bytes"]["total"]))
    print("\n| artifact | avg expert bits | perplexity RTN | perplexity GPTQ | expert bytes | predicted | error | artifact bytes |")
    print("|---|---|---|---|---|---|---|---|")
    for name, bits, ppl, size, predicted, total in rows:
        error = f"{(size - predicted) / predicted:+.2%}" if predicted else ""
        rtn_ppl, gptq_ppl = (f"{ppl['-']:.3f}", "") if "-" in ppl else (f"{ppl['rtn']:.3f}", f"{ppl['gptq']:.3f}")
        print(f"| {name} | {'' if bits is None else f'{bits:.2f}'} | {rtn_ppl} | {gptq_ppl} | {size or ''} | "
              f"{predicted or ''} | {error} | {total or ''} |")


if __name__ == "__main__":
    main()
