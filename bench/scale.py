"""Calibrate, plan and compile a Mixtral-8x7B-shaped checkpoint cut to 8 layers on a machine with
less memory than the model, and run the artifact: time and peak RSS of every stage.

The checkpoint (hidden 4096, intermediate 14336, 8 experts top-2, 8 layers, 32 heads, 8 KV heads,
vocab 32000: 11.9 B parameters, 22 GiB of bf16 safetensors in Mixtral's own per-expert layout,
one shard per decoder layer) is generated shard by shard with random weights, so generating it
needs about one shard of memory. `--fp8` writes it as DeepSeek-V3 publishes its weights instead:
every attention and expert projection float8_e4m3fn with a float32 scale per 128 x 128 tile
(`quant_method: fp8`), the rest bf16. `--layers N` cuts it to N layers. Each moec stage runs in a
fresh process whose peak RSS (ru_maxrss, file-backed pages included) is reported. Run from the
repository root:
    python bench/scale.py [--workdir /tmp/moec-scale] [--layers 8] [--fp8] [--samples 8] [--seq-len 128] [--json]
A stage whose output already exists is reused (delete it to measure it again).
"""

import argparse
import functools
import json
import shutil
import time
from pathlib import Path

from memory import measured  # bench/memory.py: seconds and peak RSS of a moec command

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=8,
             num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
             max_position_embeddings=4096, rope_theta=1e6, tie_word_embeddings=False)


FP8_BLOCK = 128


def fp8(weight):
    """float8_e4m3fn codes of a weight and the float32 scale of each 128 x 128 tile."""
    import torch

    rows, cols = weight.shape
    tiles = weight.float().reshape(rows // FP8_BLOCK, FP8_BLOCK, cols // FP8_BLOCK, FP8_BLOCK)
    scale = tiles.abs().amax(dim=(1, 3)) / 448.0  # the largest float8_e4m3fn
    return (tiles / scale[:, None, :, None]).reshape(rows, cols).to(torch.float8_e4m3fn), scale


def build(folder: Path, layers: int, as_fp8: bool) -> None:
    """Write the checkpoint one shard (one decoder layer) at a time; the folder appears complete or not at all."""
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm
    from transformers import MixtralConfig

    config = MixtralConfig(**{**SHAPE, "num_hidden_layers": layers}, dtype="bfloat16")
    if as_fp8:
        config.quantization_config = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                      "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
    h, i, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    config.save_pretrained(partial)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(ROOT / "samples" / "tiny-mixtral" / name, partial / name)
    generator = torch.Generator().manual_seed(0)

    def normal(*shape):
        return (torch.randn(*shape, generator=generator) * config.initializer_range).to(torch.bfloat16)

    def layer(n):
        p = f"model.layers.{n}."
        tensors = {p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                   p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                   p + "self_attn.q_proj.weight": normal(h, h), p + "self_attn.k_proj.weight": normal(kv, h),
                   p + "self_attn.v_proj.weight": normal(kv, h), p + "self_attn.o_proj.weight": normal(h, h),
                   p + "block_sparse_moe.gate.weight": normal(config.num_local_experts, h)}
        for e in range(config.num_local_experts):
            q = f"{p}block_sparse_moe.experts.{e}."
            tensors |= {q + "w1.weight": normal(i, h), q + "w2.weight": normal(h, i), q + "w3.weight": normal(i, h)}
        if as_fp8:
            for name in [n for n in tensors if n.endswith("proj.weight") or ".experts." in n]:
                tensors[name], tensors[f"{name}_scale_inv"] = fp8(tensors[name])
        return tensors

    shards = [lambda: {"model.embed_tokens.weight": normal(config.vocab_size, h)},
              *[functools.partial(layer, n) for n in range(config.num_hidden_layers)],
              lambda: {"model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
                       "lm_head.weight": normal(config.vocab_size, h)}]
    weight_map, total = {}, 0
    for n, shard in enumerate(tqdm(shards, desc="generate", unit="shard")):
        name = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = shard()
        save_file(tensors, partial / name, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, name)
        total += sum(t.nbytes for t in tensors.values())
        tensors = None
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/moec-scale", type=Path)
    parser.add_argument("--layers", default=SHAPE["num_hidden_layers"], type=int)
    parser.add_argument("--fp8", action="store_true", help="write the checkpoint as FP8 with 128x128 block scales")
    parser.add_argument("--samples", default=8, type=int)
    parser.add_argument("--seq-len", default=128, type=int)
    parser.add_argument("--avg-bits", default=2.5, type=float)
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args = parser.parse_args()
    work = args.workdir / (f"mixtral-8x7b-{args.layers}L" + ("-fp8" if args.fp8 else ""))
    model_dir, stats, plan, artifact = work / "model", work / "stats.json", work / "plan.json", work / "artifact"
    result = {}
    if not (model_dir / "config.json").is_file():
        start = time.perf_counter()
        build(model_dir, args.layers, args.fp8)
        result["generate"] = {"seconds": round(time.perf_counter() - start, 1)}
    weights = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    result["model"] = {"format": "fp8" if args.fp8 else "bf16", "safetensors_bytes": weights,
                       **SHAPE, "num_hidden_layers": args.layers}
    if not stats.is_file():
        result["calibrate"] = measured(["calibrate", str(model_dir), "--samples", str(args.samples),
                                        "--seq-len", str(args.seq_len), "--out", str(stats), "--quiet"])
    result["plan"] = measured(["plan", "--stats", str(stats), "--avg-bits", str(args.avg_bits), "--no-top-widths",
                               "--out", str(plan)])
    if not (artifact / "moec.json").is_file():
        result["compile"] = measured(["compile", str(model_dir), "--out", str(artifact), "--plan", str(plan),
                                      "--force", "--quiet"])
    record = json.loads((artifact / "moec.json").read_text())
    result["artifact"] = {"bytes": record["bytes"], "stages_seconds": record["seconds"],
                          "verification": record["verification"]}
    result["run"] = measured(["run", str(artifact), "--prompt", "The quick brown fox", "--max-new-tokens", "16"])
    result["bench"] = measured(["bench", str(artifact), "--prompt-len", "32", "--gen-len", "16", "--json"])
    result["bench"] |= json.loads(result["bench"].pop("stdout"))
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"model: {weights / 2**30:.1f} GiB {result['model']['format']} safetensors, {args.layers} layers")
    for stage in ("generate", "calibrate", "plan", "compile", "run", "bench"):
        if stage in result:
            peak = result[stage].get("peak_rss_bytes")
            print(f"{stage:9s} {result[stage]['seconds']:7.1f} s" + (f"   peak RSS {peak / 2**30:5.2f} GiB" if peak else ""))
    print(f"artifact: {record['bytes']['total'] / 2**30:.2f} GiB (external data {record['bytes']['external_data']:,} "
          f"bytes); compile stages {record['seconds']}")
    print(f"verification: {record['verification']}")


if __name__ == "__main__":
    main()
