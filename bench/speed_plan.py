"""A speed-budgeted plan against its promise, and against the bytes-only plan of the same loss.

On a model folder with calibration stats and a compiled CPU artifact of it (bench/compare.py's work
folder has all three: WORK/checkpoint, WORK/stats.json, WORK/moec-2.5bit):
1. `moec profile ARTIFACT` (once; `--reprofile` again): this host's seconds per routed expert token
   at each width, and the rest of a decode step;
2. the bytes-only plan at `--avg-bits` (its predicted speed from the profile), and for each
   `--faster` factor a plan with `--decode-tok-s` that factor times that speed and no byte budget;
3. for each speed plan, the bytes-only plan of least average bits (2.00, 2.05, ...) whose predicted
   loss is no higher;
4. each plan compiled (RTN) and timed by `moec bench --data` on the calibration text (teacher-forced
   decoding, so experts are routed as the stats counted them), and by plain `moec bench` (a random
   prompt, greedy decoding), in alternating rounds, each plan's fastest round kept.

    python bench/speed_plan.py WORK [--avg-bits 4] [--faster 1,1.02] [--rounds 3] [--threads 2] [--reprofile]
        [--json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import machine_line, read_bandwidth  # noqa: E402

from moec.text import DEFAULT_CORPUS  # noqa: E402


def moec(*argv: str) -> str:
    return subprocess.run([sys.executable, "-m", "moec", *argv], check=True, capture_output=True, text=True).stdout


def plan(work: Path, name: str, *budget: str) -> dict:
    out = work / f"speed-plan-{name}.json"
    moec("plan", "--stats", str(work / "stats.json"), "--profile", str(work / "profile.json"), *budget,
         "--out", str(out))
    return json.loads(out.read_text())


def same_loss_bytes_plan(work: Path, loss: float) -> tuple[float, dict]:
    """The bytes-only plan of least average bits (2.00, 2.05, ...) whose predicted loss is at most `loss`."""
    for bits in np.arange(2.0, 8.0001, 0.05):
        try:
            candidate = plan(work, f"bytes-{bits:.2f}", "--avg-bits", f"{bits:.2f}")
        except subprocess.CalledProcessError:  # below the least feasible budget
            continue
        if candidate["objective"]["predicted_loss"] <= loss:
            return float(bits), candidate
    raise SystemExit(f"no bytes-only plan up to 8 bits reaches loss {loss:g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path, help="folder with checkpoint/, stats.json and moec-2.5bit/")
    parser.add_argument("--artifact", default="moec-2.5bit", help="the artifact profiled (in WORK)")
    parser.add_argument("--avg-bits", type=float, default=4.0, help="the byte budget of every plan (default 4)")
    parser.add_argument("--faster", default="1,1.02", help="speed budgets, as factors of the bytes-only plan's")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reprofile", action="store_true", help="profile again (default: WORK/profile.json if any)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    work = args.work

    if args.reprofile or not (work / "profile.json").is_file():
        moec("profile", str(work / args.artifact), "--threads", str(args.threads), "--quiet",
             "--out", str(work / "profile.json"))
    base = plan(work, f"bytes-{args.avg_bits:g}", "--avg-bits", f"{args.avg_bits}")
    plans = {f"bytes-only, {args.avg_bits:g} bits": base}
    for factor in map(float, args.faster.split(",")):
        speed = base["objective"]["predicted_decode_tok_s"] * factor
        fast = plan(work, f"speed-{factor:g}", "--decode-tok-s", f"{speed:.2f}")
        plans[f"speed budget {speed:.1f} tok/s ({factor:g}x)"] = fast
        bits, same = same_loss_bytes_plan(work, fast["objective"]["predicted_loss"])
        plans[f"bytes-only of the same loss, {bits:.2f} bits"] = same
    folders = {}
    for name, content in plans.items():
        folder = folders[name] = work / ("speed-" + "".join(c if c.isalnum() else "-" for c in name))
        compiled = work / f"{folder.name}.plan.json"  # the plan the folder was compiled from
        if compiled.is_file() and json.loads(compiled.read_text())["experts"] == content["experts"]:
            continue
        compiled.write_text(json.dumps(content))
        moec("compile", str(work / "checkpoint"), "--plan", str(compiled), "--out", str(folder), "--force", "--quiet")
    calibration = json.loads((work / "stats.json").read_text())["calibration"]["data"]
    text = str(DEFAULT_CORPUS) if calibration.startswith("builtin:") else calibration
    measured = {name: [] for name in plans}
    greedy = {name: [] for name in plans}
    for _ in range(args.rounds):
        for name, folder in folders.items():
            bench = ("bench", str(folder), "--threads", str(args.threads), "--json")
            measured[name].append(json.loads(moec(*bench, "--data", text))["decode_tok_s"])
            greedy[name].append(json.loads(moec(*bench))["decode_tok_s"])
    rows = []
    for name, content in plans.items():
        objective = content["objective"]
        best = max(measured[name])
        rows.append({"plan": name, "predicted_loss": objective["predicted_loss"],
                     "expert_mib": objective["predicted_expert_bytes"] / 2**20,
                     "decode_budget": objective["decode_tok_s"],
                     "predicted_tok_s": objective["predicted_decode_tok_s"], "measured_tok_s": best,
                     "measured_rounds": measured[name], "greedy_tok_s": max(greedy[name]),
                     "greedy_rounds": greedy[name],
                     "error": best / objective["predicted_decode_tok_s"] - 1})
    host = machine(args.threads)
    if args.json:
        print(json.dumps({"machine": host, "rows": rows}))
        return
    print(machine_line(host) + "\n")
    print("| plan | predicted loss | expert MiB | predicted tok/s | measured on the text | measured / predicted | "
          "random prompt, greedy |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['plan']} | {r['predicted_loss']:.5g} | {r['expert_mib']:.1f} | {r['predicted_tok_s']:.1f} | "
              f"{r['measured_tok_s']:.1f} | {r['error']:+.1%} | {r['greedy_tok_s']:.1f} |")


def machine(threads: int) -> dict:
    from compare import machine as compare_machine

    return compare_machine(argparse.Namespace(bandwidth=read_bandwidth(threads), threads=threads))


if __name__ == "__main__":
    main()
