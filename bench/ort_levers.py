"""onnxruntime's levers for the experts, measured: block size, accuracy level, QMoE against
per-expert MatMulNBits, threads.

Each configuration times what `moec profile` times (moec.profile): the artifact's MoE layers, every
expert at one width, lowered by the CPU target with that configuration, one decoded token through
every layer with random routing; the figure is a routed expert's token in microseconds (median of
`--runs`). Configurations: widths 2 and 4; quantization block (group) 32, 64, 128; MatMulNBits
accuracy level 0 (float activations) and 4 (int8 activations per block); per-expert MatMulNBits,
and QMoE for the same layers (which the CPU target gives only layers of QMOE_MIN_EXPERTS or more);
and 1 against 2 threads at the target's defaults. Configurations run interleaved, `--rounds` times,
each one's fastest round kept. With `--quality ARTIFACT2 --data FILE.txt`, also the perplexity of
ARTIFACT2 (any CPU artifact, e.g. of a trained checkpoint) with its MatMulNBits and QMoE nodes at
accuracy level 4 (as compiled) and 0 (rewritten in a copy). Block sizes change the bytes and the
codes, so their quality is bench/size_quality.py's `--group-size`.

    python bench/ort_levers.py ARTIFACT [--runs 50] [--rounds 2] [--quality ARTIFACT2 --data FILE.txt] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import machine, machine_line, read_bandwidth  # noqa: E402


def expert_microseconds(record: dict, hidden: int, intermediate: int, bits: int, group: int, accuracy: int,
                        kernel: str, threads: int, runs: int) -> float:
    import moec.targets.cpu as cpu
    from moec.profile import _layers_graph, _time_layers

    target = dataclasses.replace(cpu.TARGET, accuracy_level=accuracy)
    layers = record["moe_layers"]
    fewest = 1 if kernel == "QMoE" else 10**9  # every layer to QMoE, or none
    with mock.patch.object(cpu, "QMOE_MIN_EXPERTS", fewest):
        model = _layers_graph(layers, hidden, intermediate, bits, group, target)
    assert any(node.op_type == "QMoE" for node in model.graph) == (kernel == "QMoE")
    return 1e6 * _time_layers(layers, model, threads, runs) / sum(entry["top_k"] for entry in layers)


def accuracy_level_perplexity(artifact: Path, data: str, level: int, work: Path) -> float:
    """Perplexity of `artifact` with every MatMulNBits and QMoE node at accuracy level `level`."""
    import shutil

    import onnx

    from moec.evaluate import evaluate

    copy = work / f"accuracy-{level}"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(artifact, copy)
    model = onnx.load(str(copy / "model.onnx"), load_external_data=False)
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            graphs += [attr.g for attr in node.attribute if attr.type == onnx.AttributeProto.GRAPH]
            for attr in node.attribute:
                if node.op_type in ("MatMulNBits", "QMoE") and attr.name == "accuracy_level":
                    attr.i = level
    onnx.save(model, str(copy / "model.onnx"))  # the weights stay in the copied model.onnx.data
    return evaluate(copy, data, samples=16, seq_len=256)["perplexity"]


def main() -> None:
    from moec.profile import expert_dims

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path, help="a CPU artifact: its MoE layers' shape is measured")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quality", type=Path,
                        help="an artifact whose perplexity at accuracy level 0 and 4 to measure")
    parser.add_argument("--data", help="with --quality: the text (16 windows of 256 tokens)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/moec-ort-levers"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    quality = {}
    if args.quality:
        args.workdir.mkdir(parents=True, exist_ok=True)
        quality = {level: accuracy_level_perplexity(args.quality, args.data, level, args.workdir) for level in (4, 0)}
    record = json.loads((args.artifact / "moec.json").read_text())
    hidden, intermediate = expert_dims(record, json.loads((args.artifact / "config.json").read_text()))
    grid = [dict(bits=b, group=g, accuracy=a, kernel=k, threads=2)
            for b, g, a, k in itertools.product((2, 4), (32, 64, 128), (0, 4), ("MatMulNBits", "QMoE"))]
    grid += [dict(bits=b, group=128, accuracy=4, kernel="MatMulNBits", threads=1) for b in (2, 4)]
    best = [float("inf")] * len(grid)
    for _ in range(args.rounds):
        for i, config in enumerate(grid):
            best[i] = min(best[i], expert_microseconds(record, hidden, intermediate, runs=args.runs, **config))
            print(f"{config}: {best[i]:.1f} us", file=sys.stderr, flush=True)
    rows = [config | {"expert_us": us} for config, us in zip(grid, best)]
    host = machine(argparse.Namespace(bandwidth=read_bandwidth(2), threads=2))
    if args.json:
        print(json.dumps({"machine": host, "hidden": hidden, "intermediate": intermediate,
                          "experts": record["moe_layers"][0]["num_experts"], "rows": rows,
                          "perplexity_by_accuracy_level": quality}))
        return
    print(machine_line(host))
    print(f"\nexperts {hidden} x {intermediate}, {record['moe_layers'][0]['num_experts']} a layer, top-"
          f"{record['moe_layers'][0]['top_k']}, {len(record['moe_layers'])} layers; a routed expert's token, us\n")
    print("| bits | block | accuracy level | kernel | threads | us |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['bits']} | {r['group']} | {r['accuracy']} | {r['kernel']} | {r['threads']} | "
              f"{r['expert_us']:.1f} |")
    if quality:
        print(f"\n{args.quality} on {args.data}: perplexity {quality[4]:.4f} at accuracy level 4, "
              f"{quality[0]:.4f} at 0")


if __name__ == "__main__":
    main()
