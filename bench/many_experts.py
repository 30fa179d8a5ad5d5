"""A 128-expert, top-8 Qwen3-MoE-proportioned random model (small hidden size): compile time,
node count, session-creation time and a short greedy run of the artifact, in float or with every
expert at `--bits` (blocks of 64: two a row of its 128-wide experts, as QMoE needs); `--per-expert`
compiles the quantized experts one by one, as moec did before it handed layers of many experts to
QMoE (it raises moec.targets.cpu.QMOE_MIN_EXPERTS above 128).

Run from the repository root:
    python bench/many_experts.py [--workdir /tmp/moec-many] [--layers 4] [--bits 4 [--per-expert]]
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/moec-many", type=Path)
    parser.add_argument("--layers", default=4, type=int)
    parser.add_argument("--bits", type=int, choices=(2, 4, 8), help="every expert at this width (default: float)")
    parser.add_argument("--per-expert", action="store_true", help="no QMoE: each quantized expert on its own")
    args = parser.parse_args()
    import onnx
    import torch
    import transformers

    import moec
    import moec.targets.cpu
    from moec.planner import DEFAULT_NON_EXPERT, save_plan
    from moec.runtime import Artifact, generate

    if args.per_expert:
        moec.targets.cpu.QMOE_MIN_EXPERTS = 129

    model_dir, artifact = args.workdir / "qwen3-moe-128", args.workdir / "artifact"
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(vocab_size=32000, hidden_size=512, intermediate_size=1024,
                                         moe_intermediate_size=128, num_hidden_layers=args.layers,
                                         num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                                         num_experts=128, num_experts_per_tok=8, norm_topk_prob=True)
    transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(ROOT / "samples" / "tiny-mixtral" / name, model_dir / name)
    plan = None
    if args.bits:
        plan = args.workdir / f"plan-{args.bits}.json"
        save_plan({"format": "moec-plan/1", "model": str(model_dir),
                   "experts": {"bits": [[args.bits] * 128] * args.layers}, "non_expert": DEFAULT_NON_EXPERT,
                   "quantization": {"method": "rtn", "group_size": 64}, "pruning": {}}, plan)
    start = time.perf_counter()
    record = moec.compile(model_dir, artifact, plan=plan, force=True, progress=False)
    compile_s = time.perf_counter() - start
    graph = onnx.load(str(artifact / "model.onnx"), load_external_data=False).graph

    def count(g) -> int:  # with the nodes of If subgraphs (experts are computed in them)
        return sum(1 + sum(count(a.g) for a in n.attribute if a.type == onnx.AttributeProto.GRAPH) for n in g.node)

    nodes, subgraphs = count(graph), sum(n.op_type == "If" for n in graph.node)
    start = time.perf_counter()
    session = Artifact(artifact)
    session_s = time.perf_counter() - start
    start = time.perf_counter()
    tokens = [int(step[0]) for step in generate(session, [[11, 22, 33, 44]], 32)]
    decode_s = (time.perf_counter() - start) / len(tokens)
    result = {"layers": args.layers, "experts": 128, "top_k": 8, "bits": args.bits or "float",
              "lowering": "QMoE" if record["quantization"] and record["quantization"]["kernels"]["com.microsoft.QMoE"]
              else "per expert",
              "parameters": record["parameters"]["total"],
              "compile_s": round(compile_s, 1), "nodes": nodes, "top_level_nodes": len(graph.node),
              "expert_subgraphs": subgraphs, "session_create_s": round(session_s, 2),
              "seconds_per_token": round(decode_s, 4), "verification": record["verification"]["max_abs_logit_diff"],
              "generated": len(tokens)}
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
