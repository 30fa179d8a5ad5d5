"""The frontier families at scale: DeepSeek-V3.2-, Kimi-Linear- and DeepSeek-V4-proportioned random
models of 8 layers, calibrated, planned at `--avg-bits` (2.5) and compiled, then timed with `moec bench`.

"Proportioned" keeps each real model's structure and ratios, scaled to hidden 512: DeepSeek-V3.2's
256 experts top-8 with one shared expert, MLA, and its lightning indexer (index heads, head size and
top-k scaled alike; the top-k below the prompt so the sparse choice matters); Kimi-Linear's 256
experts top-8 with one shared expert, three Kimi-delta-attention layers to one MLA layer;
DeepSeek-V4-Flash's (below). The
weights are random, so the numbers are speed and size, not quality. Run from the repository root:

    python bench/frontier.py [--workdir /tmp/moec-frontier] [--avg-bits 2.5] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

HIDDEN = 512
MLA = dict(num_attention_heads=8, num_key_value_heads=8, q_lora_rank=192, kv_lora_rank=64, qk_rope_head_dim=16,
           qk_nope_head_dim=32, v_head_dim=32)
SHAPES = {
    "deepseek_v32": dict(**MLA, hidden_size=HIDDEN, intermediate_size=1536, moe_intermediate_size=128,
                         num_hidden_layers=8, first_k_dense_replace=1, n_routed_experts=256, n_group=8, topk_group=4,
                         num_experts_per_tok=8, n_shared_experts=1, index_topk=64, index_head_dim=32,
                         index_n_heads=16, mlp_layer_types=["dense"] + ["sparse"] * 7,
                         layer_types=["indexed_attention"] * 8),
    "kimi_linear": dict(**{k: v for k, v in MLA.items() if k != "q_lora_rank"}, q_lora_rank=None,
                        hidden_size=HIDDEN, intermediate_size=1536, moe_intermediate_size=128, num_hidden_layers=8,
                        num_experts=256, num_experts_per_token=8, num_shared_experts=1, num_expert_group=1,
                        topk_group=1, linear_head_dim=64, linear_num_heads=8, linear_conv_kernel_dim=4,
                        layer_types=["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3
                        + ["full_attention"],
                        mlp_layer_types=["dense"] + ["sparse"] * 7),
    # DeepSeek-V4-Flash scaled by 8 (heads, head size, ranks, expert width, indexer); its 256 experts
    # top-6, four hyper-connection streams, windows of 4 and 128 tokens and sliding window as they are;
    # the first three layers hash-routed, two heavily compressed then alternating with compressed sparse
    "deepseek_v4": dict(hidden_size=HIDDEN, num_attention_heads=8, num_key_value_heads=1, head_dim=64,
                        q_lora_rank=128, moe_intermediate_size=256, num_hidden_layers=8, n_routed_experts=256,
                        num_experts_per_tok=6, n_shared_experts=1, o_groups=1, o_lora_rank=128, index_n_heads=8,
                        index_head_dim=16, index_topk=16, num_nextn_predict_layers=0),
}


def moec(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "moec", *args], check=True, capture_output=True, text=True).stdout


def isa_flags() -> str:
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), [])
    return " ".join(f for f in flags if f.startswith(("avx", "amx", "fma")))


def run(arch: str, work: Path, avg_bits: float, text: Path) -> dict:
    import tiny

    model, stats, plan, artifact = (work / arch / name for name in ("model", "stats.json", "plan.json", "artifact"))
    row = {"model_type": arch}
    if not model.exists():
        from transformers import CONFIG_MAPPING

        config = CONFIG_MAPPING[arch](**{**tiny.COMMON, **SHAPES[arch], "max_position_embeddings": 4096})
        tiny.save_tiny(arch, model, seed=0, config=config)
    config = json.loads((model / "config.json").read_text())
    for step, out, args in (("calibrate", stats, ["calibrate", str(model), "--data", str(text), "--samples", "8",
                                                  "--seq-len", "128", "--out", str(stats)]),
                            ("plan", plan, ["plan", "--stats", str(stats), "--avg-bits", str(avg_bits), "--out", str(plan)]),
                            ("compile", artifact, ["compile", str(model), "--plan", str(plan), "--out", str(artifact),
                                                   "--force"])):
        start = time.perf_counter()
        if not out.exists():
            moec(*args)
        row[f"{step}_s"] = round(time.perf_counter() - start, 1)
    record = json.loads((artifact / "moec.json").read_text())
    row["artifact_mib"] = round(record["bytes"]["total"] / 2**20, 1)
    row["max_abs_logit_diff"] = record["verification"]["max_abs_logit_diff"]
    row["layers"] = config["num_hidden_layers"]
    row |= json.loads(moec("bench", str(artifact), "--json", "--threads", "2"))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/moec-frontier"))
    parser.add_argument("--avg-bits", type=float, default=2.5)
    parser.add_argument("--types", default=",".join(SHAPES), help="comma-separated: " + ", ".join(SHAPES))
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    text = args.workdir / "calibration.txt"
    text.write_text("\n".join(p.read_text() for p in sorted(ROOT.glob("docs/*.md"))))
    print(f"host: {platform.processor() or platform.machine()}, ISA: {isa_flags()}")
    rows = [run(arch, args.workdir, args.avg_bits, text) for arch in args.types.split(",")]
    for row in rows:
        print(json.dumps(row))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
