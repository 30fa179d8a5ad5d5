"""What width 0 (the loss of dropping an expert) costs calibration: `moec calibrate` with widths
2,4,8 against 0,2,4,8, on the sample and on a 64-expert, top-8 Qwen3-MoE-proportioned random model,
alternating in one process; the ratio of the medians, and whether the 2/4/8 losses agree.

    python bench/calibrate_widths.py [--workdir /tmp/moec-widths] [--samples 16] [--seq-len 128] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

MANY_EXPERTS = dict(hidden_size=512, head_dim=64, num_attention_heads=8, num_key_value_heads=4, intermediate_size=1024,
                    moe_intermediate_size=256, num_hidden_layers=4, num_experts=64, num_experts_per_tok=8,
                    norm_topk_prob=True)


def losses(stats: dict, widths=("2", "4", "8")) -> list[float]:
    return [e["quant_loss"][w] for layer in stats["layers"] for e in layer["experts"] for w in widths]


def measure(model: Path, text: Path, samples: int, seq_len: int, rounds: int) -> dict:
    from moec.calibrate import calibrate

    times = {(2, 4, 8): [], (0, 2, 4, 8): []}
    stats = {}
    for _ in range(rounds):
        for bits in times:
            start = time.perf_counter()
            stats[bits] = calibrate(model, data=text, samples=samples, seq_len=seq_len, bits=bits, progress=False)
            times[bits].append(time.perf_counter() - start)
    same, with_zero = losses(stats[(2, 4, 8)]), losses(stats[(0, 2, 4, 8)])
    return {"seconds_2_4_8": [round(t, 1) for t in times[(2, 4, 8)]],
            "seconds_0_2_4_8": [round(t, 1) for t in times[(0, 2, 4, 8)]],
            "ratio": round(statistics.median(times[(0, 2, 4, 8)]) / statistics.median(times[(2, 4, 8)]), 2),
            "losses_equal": same == with_zero}


def main() -> None:
    import tiny

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/moec-widths"))
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    text = args.workdir / "calibration.txt"
    text.write_text("\n".join(p.read_text() for p in sorted(ROOT.glob("docs/*.md"))))
    many = args.workdir / "qwen3_moe-64-experts"
    if not many.exists():
        tiny.save_tiny("qwen3_moe", many, seed=0, **MANY_EXPERTS)
    for name, model in (("samples/tiny-mixtral", ROOT / "samples" / "tiny-mixtral"), ("64 experts, top-8", many)):
        row = {"model": name, **measure(model, text, args.samples, args.seq_len, args.rounds)}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
