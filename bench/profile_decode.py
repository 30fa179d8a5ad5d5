"""Where a decode step's time goes: onnxruntime's profiler over greedy decode steps of an artifact,
summed by op type and by part of the model (attention, MoE, norms, embedding and head, other).

    python bench/profile_decode.py ARTIFACT [--prompt-len 128] [--steps 32] [--threads 2] [--json]

The prompt is prefilled first (its events are left out), then `steps` tokens are decoded one at a
time; each row is microseconds per decoded token, summed over that kind's nodes (their own kernel
time, as the profiler records it), and the node count per token. Kernel time adds up to less than
the step: the rest is onnxruntime's scheduling, allocation and copying between nodes.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

PARTS = (("norms", re.compile(r"norm", re.I)),
         ("MoE", re.compile(r"experts|\.moe/|mlp|QMoE|DynamicGating|router|gate", re.I)),
         ("attention", re.compile(r"self_attn|attention|rotary|GroupQueryAttention", re.I)),
         ("embedding and head", re.compile(r"embed|lm_head", re.I)))


def part(node_name: str) -> str:
    return next((name for name, pattern in PARTS if pattern.search(node_name)), "other")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--prompt-len", default=128, type=int)
    parser.add_argument("--steps", default=32, type=int)
    parser.add_argument("--threads", default=2, type=int)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.steps < 1 or args.prompt_len < 1:
        parser.error("--steps and --prompt-len must be at least 1")
    import onnxruntime as ort

    from moec.runtime import empty_past, present_name, read_record

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.enable_profiling = True
    options.profile_file_prefix = str(args.artifact / ".profile")
    session = ort.InferenceSession(str(args.artifact / "model.onnx"), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    vocab = next(o.shape[-1] for o in session.get_outputs() if o.name == "logits")
    # as moec's runtime runs it: a past the graph appends to in place is one buffer with room for the
    # whole sequence, bound as its present too
    in_place = set(read_record(args.artifact).get("kv_in_place", ()))
    past = {name: ort.OrtValue.ortvalue_from_numpy(array)
            for name, array in empty_past(session, 1, args.prompt_len + args.steps, in_place).items()}
    step = np.random.default_rng(0).integers(0, vocab, (1, args.prompt_len))
    seen = 0
    for index in range(1 + args.steps):
        total = seen + step.shape[1]
        feeds = {"input_ids": step, "attention_mask": np.ones((1, total), np.int64),
                 "position_ids": np.arange(seen, total)[None]}
        binding = session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        for name, value in past.items():
            binding.bind_ortvalue_input(name, value)
        for name in names:
            shared = name.replace("present.", "past_key_values.", 1)
            if shared in in_place:
                binding.bind_ortvalue_output(name, past[shared])
            else:
                binding.bind_output(name)
        session.run_with_iobinding(binding)
        outputs = dict(zip(names, binding.get_outputs()))
        past = {name: past[name] if name in in_place else outputs[present_name(name)] for name in past}
        seen, step = total, outputs["logits"].numpy()[:, -1:].argmax(-1)
    profile = Path(session.end_profiling())
    events = json.loads(profile.read_text())
    profile.unlink()
    runs = [e for e in events if e.get("name") == "model_run"]
    decode_start = runs[1]["ts"]  # the first run is the prefill
    by_op, by_part, count = defaultdict(float), defaultdict(float), defaultdict(int)
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time") or event["ts"] < decode_start:
            continue
        op = event["args"]["op_name"]
        by_op[op] += event["dur"] / args.steps
        by_part[part(event["name"])] += event["dur"] / args.steps
        count[op] += 1 / args.steps
    step_us = sum(r["dur"] for r in runs[1:]) / args.steps
    result = {"artifact": str(args.artifact), "threads": args.threads, "steps": args.steps,
              "step_us": step_us, "kernel_us": sum(by_op.values()), "nodes_per_step": sum(count.values()),
              "by_part_us": dict(sorted(by_part.items(), key=lambda kv: -kv[1])),
              "by_op": {op: {"us": by_op[op], "nodes": count[op]} for op in sorted(by_op, key=lambda o: -by_op[o])}}
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"{args.artifact}: {step_us:.0f} us a decode step ({args.threads} threads), of which node kernels "
          f"{result['kernel_us']:.0f} us over {result['nodes_per_step']:.0f} nodes")
    print("\n| part | us / token |\n|---|---|")
    for name, us in result["by_part_us"].items():
        print(f"| {name} | {us:.0f} |")
    print("\n| op type | us / token | nodes / token |\n|---|---|---|")
    for op, row in list(result["by_op"].items())[:20]:
        print(f"| {op} | {row['us']:.0f} | {row['nodes']:.0f} |")


if __name__ == "__main__":
    sys.exit(main())
