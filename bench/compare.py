"""Side by side on this machine: moec artifacts, transformers and llama.cpp on the same random MoE models.

For each model (random bf16 weights, built here): Mixtral-proportioned (hidden 1024, intermediate
3584, 8 experts top-2, 8 layers, 16 heads, 4 KV heads, vocab 32000) and OLMoE-proportioned (64
experts top-8, intermediate 512, 16 KV heads), every system runs in a fresh process with the same
threads, a 128-token prompt and 64 greedy tokens with the KV cache (median of the repeats after a
warm-up; every system is measured in each of the rounds, round-robin, and its fastest round kept):
  - transformers in PyTorch, fp32 and bf16;
  - llama.cpp through llama-cpp-python: F16 GGUF from its converter, quantized to Q2_K, Q3_K_S, Q4_K_M, Q8_0;
  - with `--llama-tools BUILD/bin`, the same GGUFs measured by llama.cpp's own `llama-bench` (the figure
    its users quote; build it with bench/build_llamacpp.py from the same llama-cpp-python sdist), and
    IQ2_XS and IQ3_XXS quantized with an importance matrix from `llama-imatrix` on moec's calibration
    corpus (as many windows of 256 tokens as moec calibrates on, `--samples`);
  - with `--ik-tools BUILD/bin`, ik_llama.cpp (its own `llama-quantize` from the F16 GGUF to IQ2_K,
    IQ2_KS, IQ3_K, Q2_K, Q3_K_S, Q4_K_M, timed by its `llama-bench -rtr 1 -fmoe 1`); a model whose
    architecture it lacks gets a line saying so, and with `--llama-tools` too a line says whether its F16
    computes the model as mainline's does (KL divergence on mainline's own tokens);
  - mobius-onnx (PyPI, Microsoft's ONNX GenAI model builder): `mobius build --config DIR OUT --ep cpu
    --optimize --dtype f32` (GroupQueryAttention, SkipSimplifiedLayerNormalization), run by plain
    onnxruntime. In float32: it quantizes only checkpoints that arrive quantized (a
    quantization_config, or a GGUF through `mobius build-gguf --keep-quantized`, whose importer
    takes neither model here: OLMoE is not among its GGUF architectures, and it reads the Mixtral
    GGUF as a dense Llama and stops on missing MLP weights);
  - moec artifacts planned at 2.25, 2.5, 3, 4 and 8 average expert bits (calibrated on the built-in corpus).
One table per model: weight bytes, prefill and decode tok/s, peak RSS, and decode as a fraction of
the bandwidth limit (measured read bandwidth / weight bytes read per decoded token). It also checks
that the 8-bit artifact generates through moec's runtime (IO binding, tuned session options)
exactly what a plain onnxruntime session generates.

    pip install -e ".[bench]" && python bench/compare.py [--workdir /tmp/moec-compare]
        [--llama-tools LLAMA/build/bin] [--ik-tools IK/build/bin] [--json]

Every stage's output in the workdir is reused when present; the results are also written to
WORKDIR/results.json. Run it on an otherwise idle machine: with 2 threads on 2 cores, any other busy
process slows every system here several times over.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "mixtral": {"class": "MixtralForCausalLM", "config": "MixtralConfig", "top_k": 2, "experts": 8,
                "args": {"vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 3584,
                         "num_hidden_layers": 8, "num_attention_heads": 16, "num_key_value_heads": 4,
                         "num_local_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 4096,
                         "tie_word_embeddings": False}},
    "olmoe": {"class": "OlmoeForCausalLM", "config": "OlmoeConfig", "top_k": 8, "experts": 64,
              "args": {"vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 512,
                       "num_hidden_layers": 8, "num_attention_heads": 16, "num_key_value_heads": 16,
                       "num_experts": 64, "num_experts_per_tok": 8, "max_position_embeddings": 4096,
                       "tie_word_embeddings": False}},
}
# 2.25, not 2: the bench Mixtral's super expert, kept at 8 bits, puts its least feasible budget at 2.09 bits
MOEC_BITS = (2.25, 2.5, 3, 4, 8)
GGUF_TYPES = ("Q2_K", "Q3_K_S", "Q4_K_M", "Q8_0")
IMATRIX_TYPES = ("IQ2_XS", "IQ3_XXS")  # i-quants: they need an importance matrix (from moec's calibration corpus)
IK_TYPES = ("IQ2_K", "IQ2_KS", "IQ3_K", "Q2_K", "Q3_K_S", "Q4_K_M")
IK_OPTIONS = ("-rtr", "1", "-fmoe", "1")  # run-time repacking and fused MoE, as ik_llama.cpp's users run it
# ik's F16 this close to mainline's computes the same model (a dense Llama: 3e-6 nats; ik 8337e4cd3 on Mixtral,
# whose MoE layers add the normed input for the residual: 0.29 on the random bench model, 5.6 on a trained one)
IK_SAME_MODEL_KLD = 1e-3
EXPERT_NAME = re.compile(r"\.experts\.")
EMBEDDING_NAME = re.compile(r"embed_tokens")


def build(name: str, folder: Path) -> None:
    """A random bf16 checkpoint with the sample's tokenizer (written to a temporary name first)."""
    import torch
    import transformers

    spec = MODELS[name]
    torch.manual_seed(0)
    config = getattr(transformers, spec["config"])(**spec["args"])
    model = getattr(transformers, spec["class"])(config).to(torch.bfloat16)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, max_shard_size="500MB")
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(ROOT / "samples" / "tiny-mixtral" / file, partial / file)
    partial.rename(folder)


def read_bandwidth(threads: int, megabytes: int = 512) -> float:
    """Bytes per second that `threads` threads read, best of 5: NumPy's max over float32 (vectorized,
    and it releases the GIL) read fastest of sum, max, bitwise-or and dot here. Other load lowers it,
    so it is measured again before each round and the highest reading kept."""
    data = np.ones(megabytes * 2**20 // 4, np.float32)
    parts = np.array_split(data, threads)
    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(5):
            start = time.perf_counter()
            list(pool.map(np.max, parts))
            best = max(best, data.nbytes / (time.perf_counter() - start))
    return best


def active_bytes(sizes: dict[str, int], top_k: int, experts: int, vocab: int) -> int:
    """Weight bytes one decoded token reads: top_k / experts of the routed experts, one embedding row."""
    total = 0.0
    for name, nbytes in sizes.items():
        if EXPERT_NAME.search(name):
            total += nbytes * top_k / experts
        elif EMBEDDING_NAME.search(name):
            total += nbytes / vocab
        else:
            total += nbytes
    return int(total)


def torch_sizes(model_dir: Path, dtype_bytes: int) -> dict[str, int]:
    from safetensors import safe_open

    sizes = {}
    for shard in model_dir.glob("*.safetensors"):
        with safe_open(shard, "np") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                sizes[key] = int(np.prod(f.get_slice(key).get_shape())) * dtype_bytes
    return sizes


def artifact_sizes(artifact: Path) -> dict[str, int]:
    """Each initializer's stored bytes (external data lengths; no weights are loaded)."""
    import onnx

    sizes = {}
    for tensor in onnx.load(str(artifact / "model.onnx"), load_external_data=False).graph.initializer:
        length = {e.key: e.value for e in tensor.external_data}.get("length")
        sizes[tensor.name] = int(length) if length else len(tensor.raw_data)
    return sizes


def fresh_process(code: str) -> dict:
    """Run Python `code` (which prints one JSON object last) in a fresh process; add its peak RSS."""
    probe = code + "\nfrom moec.bench import peak_rss_mb; print(peak_rss_mb())"
    run = subprocess.run([sys.executable, "-c", probe], check=False, capture_output=True, text=True, cwd=ROOT)
    if run.returncode:
        sys.exit(f"measurement failed:\n{run.stderr[-3000:]}")
    lines = run.stdout.strip().splitlines()
    return json.loads(lines[-2]) | {"peak_rss_mb": float(lines[-1])}


def speeds(args) -> str:
    """The last line of a measuring program (fresh_process): tok/s from the median of its `prefill`
    and `decode` times."""
    return (f'print(json.dumps({{"prefill_tok_s": {args.prompt_len} / statistics.median(prefill), '
            f'"decode_tok_s": {args.gen_len} / statistics.median(decode)}}))')


def transformers_speed(model_dir: Path, dtype: str, args, device: str = "cpu") -> dict:
    sync = "torch.cuda.synchronize()" if device == "cuda" else "pass"  # wait for the GPU before reading the clock
    code = f"""
import json, statistics, time, numpy as np, torch
from transformers import AutoModelForCausalLM
torch.set_num_threads({args.threads})
model = AutoModelForCausalLM.from_pretrained({str(model_dir)!r}, dtype=torch.{dtype}).to({device!r}).eval()
prompt = torch.from_numpy(np.random.default_rng(0).integers(0, 2048, (1, {args.prompt_len}))).to({device!r})
prefill, decode = [], []
with torch.inference_mode():
    for run in range({1 + args.repeats}):
        {sync}
        start = time.perf_counter()
        out = model(prompt, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        {sync}
        prefilled = time.perf_counter()
        for _ in range({args.gen_len}):
            out = model(token, past_key_values=out.past_key_values, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        {sync}
        if run:
            prefill.append(prefilled - start)
            decode.append(time.perf_counter() - prefilled)
{speeds(args)}
"""
    return fresh_process(code)


def moec_speed(artifact: Path, args) -> dict:
    code = f"""
import json
from moec.bench import bench
print(json.dumps(bench({str(artifact)!r}, prompt_len={args.prompt_len}, gen_len={args.gen_len},
                       threads={args.threads}, repeats={args.repeats})))
"""
    return fresh_process(code)


def mobius_build(model_dir: Path, workdir: Path) -> Path:
    out = workdir / "mobius-f32"
    if not (out / "model.onnx").is_file():
        partial = out.with_name(out.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        start = time.perf_counter()
        built = subprocess.run(["mobius", "build", "--config", str(model_dir), str(partial), "--ep", "cpu",
                                "--optimize", "--dtype", "f32"], check=False, capture_output=True, text=True)
        if built.returncode:
            sys.exit(f"mobius build failed:\n{built.stderr[-3000:]}")
        partial.rename(out)
        print(f"  mobius build: {time.perf_counter() - start:.0f} s", flush=True)
    return out


def mobius_speed(model: Path, args) -> dict:
    """Greedy prefill and decode of a mobius-onnx model (inputs: ids, attention mask, past KV) in plain onnxruntime."""
    code = f"""
import json, statistics, time, numpy as np, onnxruntime as ort
options = ort.SessionOptions()
options.intra_op_num_threads = {args.threads}
session = ort.InferenceSession({str(model / "model.onnx")!r}, options, providers=["CPUExecutionProvider"])
pasts = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
names = [o.name for o in session.get_outputs()]
prompt = np.random.default_rng(0).integers(0, 2048, (1, {args.prompt_len}))
prefill, decode = [], []
for run in range({1 + args.repeats}):
    past = {{i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in pasts}}
    start = time.perf_counter()
    ids, total = prompt, {args.prompt_len}
    for step in range({1 + args.gen_len}):
        feeds = {{"input_ids": ids, "attention_mask": np.ones((1, total), np.int64)}}
        out = dict(zip(names, session.run(None, feeds | past)))
        past = {{i.name: out[i.name.replace("past_key_values.", "present.")] for i in pasts}}
        ids = out["logits"][:, -1:].argmax(-1)
        total += 1
        if step == 0:
            prefilled = time.perf_counter()
    if run:
        prefill.append(prefilled - start)
        decode.append(time.perf_counter() - prefilled)
{speeds(args)}
"""
    return fresh_process(code)


def moec(*argv: str) -> None:
    subprocess.run([sys.executable, "-m", "moec", *argv], check=True, stdout=subprocess.DEVNULL)


def moec_artifacts(model_dir: Path, workdir: Path, args) -> dict[float, Path]:
    stats = workdir / "stats.json"
    if not stats.is_file():
        start = time.perf_counter()
        moec("calibrate", str(model_dir), "--samples", str(args.samples), "--seq-len", "256", "--out", str(stats),
             "--quiet")
        print(f"  moec calibrate: {time.perf_counter() - start:.0f} s", flush=True)
    artifacts = {}
    for bits in MOEC_BITS:
        plan, artifact = workdir / f"plan-{bits:g}.json", workdir / f"moec-{bits:g}bit"
        if not (artifact / "moec.json").is_file():
            moec("plan", "--stats", str(stats), "--avg-bits", str(bits), "--no-top-widths", "--out", str(plan))
            start = time.perf_counter()
            moec("compile", str(model_dir), "--plan", str(plan), "--out", str(artifact), "--force", "--quiet")
            print(f"  moec compile {bits:g} bits: {time.perf_counter() - start:.0f} s", flush=True)
        artifacts[bits] = artifact
    return artifacts


def runtime_unchanged(artifact: Path, tokens: int = 32) -> dict:
    """moec's runtime (IO binding, the artifact's tuned session options) against a plain onnxruntime
    session fed NumPy caches: greedy tokens and the largest logit difference over the same steps."""
    import onnxruntime as ort

    from moec.runtime import Artifact, empty_past, generate

    prompt = [int(t) for t in np.random.default_rng(1).integers(0, 2048, 16)]
    runtime = Artifact(artifact)
    generated = [int(t[0]) for t in generate(runtime, [prompt], tokens)]
    plain = ort.InferenceSession(str(artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in plain.get_outputs()]
    past = empty_past(plain, 1)
    bound = runtime.empty_cache(1)
    step, seen, reference, logits_diff = np.array([prompt]), 0, [], 0.0
    for _ in range(tokens):
        total = seen + step.shape[1]
        feeds = {"input_ids": step, "attention_mask": np.ones((1, total), np.int64),
                 "position_ids": np.arange(seen, total)[None]}
        outputs = dict(zip(names, plain.run(None, feeds | past)))
        logits, bound = runtime.forward(step, feeds["attention_mask"], feeds["position_ids"], bound)
        logits_diff = max(logits_diff, float(np.abs(logits - outputs["logits"]).max()))
        past = {name: outputs[name.replace("past_key_values.", "present.")] for name in past}
        reference.append(int(outputs["logits"][0, -1].argmax()))
        seen, step = total, np.array([[reference[-1]]])
    return {"tokens": tokens, "identical": generated == reference, "max_abs_logit_diff": logits_diff}


def compare(name: str, args) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import llamacpp  # needs llama-cpp-python (the bench extra)

    spec = MODELS[name]
    workdir = args.workdir / name
    model_dir = workdir / "checkpoint"
    if not (model_dir / "config.json").is_file():
        workdir.mkdir(parents=True, exist_ok=True)
        print(f"{name}: building the checkpoint", flush=True)
        subprocess.run([sys.executable, __file__, "--build", name, str(model_dir)], check=True)
    vocab, top_k, experts = spec["args"]["vocab_size"], spec["top_k"], spec["experts"]
    systems = []  # (row without speeds, measurement)
    for dtype, width in (("float32", 4), ("bfloat16", 2)):
        sizes = torch_sizes(model_dir, width)
        systems.append(({"system": f"transformers {'fp32' if width == 4 else 'bf16'}", "bytes": sum(sizes.values()),
                         "active_bytes": active_bytes(sizes, top_k, experts, vocab)},
                        functools.partial(transformers_speed, model_dir, dtype, args)))
    ggufs = llamacpp.gguf_files(model_dir, workdir / "gguf", GGUF_TYPES)
    for kind in ("F16", *GGUF_TYPES):
        systems.append(({"system": f"llama.cpp {kind}",
                         "active_bytes": llamacpp.active_bytes(ggufs[kind], top_k, experts)},
                        functools.partial(llamacpp.measure, ggufs[kind], prompt_len=args.prompt_len,
                                          gen_len=args.gen_len, threads=args.threads, repeats=args.repeats)))
    bench = functools.partial(llamacpp.bench_with, prompt_len=args.prompt_len, gen_len=args.gen_len,
                              threads=args.threads, repeats=args.repeats)
    if args.llama_tools:
        from moec.text import DEFAULT_CORPUS

        imatrix = llamacpp.imatrix_ggufs(ggufs["F16"], args.llama_tools, DEFAULT_CORPUS, workdir / "gguf",
                                         IMATRIX_TYPES, chunks=args.samples)  # as many tokens as moec calibrates on
        for kind, gguf in [*((kind, ggufs[kind]) for kind in GGUF_TYPES),
                           *((f"{kind} + imatrix", gguf) for kind, gguf in imatrix.items())]:
            systems.append(({"system": f"llama.cpp {kind}, llama-bench",
                             "active_bytes": llamacpp.active_bytes(gguf, top_k, experts)},
                            functools.partial(bench, args.llama_tools, gguf)))
    unavailable, ik_check = [], None
    if args.ik_tools and args.llama_tools:  # does ik compute this model as mainline does? (bench/peer_quality.py)
        from moec.text import DEFAULT_CORPUS

        base = llamacpp.kl_base(args.llama_tools, ggufs["F16"], DEFAULT_CORPUS, workdir / "gguf" / "mainline-F16.kld",
                                chunks=args.samples)
        try:
            ik_check = llamacpp.kl_divergence(args.ik_tools, ggufs["F16"], base)
        except RuntimeError as e:  # an architecture ik lacks (OLMoE): its quants below say so too
            unavailable.append(f"ik_llama.cpp F16: {str(e).splitlines()[0]}")
    for kind in IK_TYPES if args.ik_tools else ():
        try:
            gguf = llamacpp.quantize_with(args.ik_tools, ggufs["F16"], kind, workdir / "gguf" / f"ik-{kind}.gguf")
        except RuntimeError as e:
            unavailable.append(f"ik_llama.cpp {kind}: {str(e).splitlines()[0]}")
            continue
        try:  # mainline's gguf-py reads no ik-only tensor type (IQ2_K, ...): no bandwidth fraction then
            read = llamacpp.active_bytes(gguf, top_k, experts)
        except ValueError:
            read = None
        systems.append(({"system": f"ik_llama.cpp {kind}, llama-bench -rtr 1 -fmoe 1", "active_bytes": read},
                        functools.partial(bench, args.ik_tools, gguf, extra=IK_OPTIONS)))
    if shutil.which("mobius"):
        mobius = mobius_build(model_dir, workdir)
        sizes = artifact_sizes(mobius)
        # its MoE computes every expert on every token (masked after): a token reads all but one embedding row
        systems.append(({"system": "mobius-onnx f32", "bytes": sum(sizes.values()),
                         "active_bytes": active_bytes(sizes, experts, experts, vocab)},
                        functools.partial(mobius_speed, mobius, args)))
    else:
        print("  mobius-onnx: no `mobius` command (pip install mobius-onnx); its row is left out", flush=True)
    artifacts = moec_artifacts(model_dir, workdir, args)
    for bits, artifact in artifacts.items():
        sizes = artifact_sizes(artifact)
        systems.append(({"system": f"moec {bits:g}-bit", "bytes": sum(sizes.values()),
                         "active_bytes": active_bytes(sizes, top_k, experts, vocab)},
                        functools.partial(moec_speed, artifact, args)))
    if args.only:
        systems = [(row, measure) for row, measure in systems if re.search(args.only, row["system"])]
    # round-robin: a burst of other load on the machine hits one round of a system, not all of them
    rounds: list[list[dict]] = [[] for _ in systems]
    for round_number in range(args.rounds):
        args.bandwidth = max(args.bandwidth, read_bandwidth(args.threads))  # the least disturbed reading
        for (row, measure), measured in zip(systems, rounds):
            print(f"{name}: {row['system']} (round {round_number + 1}/{args.rounds})", flush=True)
            try:
                measured.append(measure())
            except RuntimeError as e:  # a peer's tool refusing the model (an architecture it lacks)
                unavailable.append(f"{row['system']}: {str(e).splitlines()[0]}")
                measured.append(None)
    rows = []
    for (row, _), measured in zip(systems, rounds):
        if None in measured:
            continue
        best = max(measured, key=lambda m: m["decode_tok_s"])
        rows.append(row | best | {"decode_tok_s_rounds": [m["decode_tok_s"] for m in measured],
                                  "prefill_tok_s": max(m["prefill_tok_s"] for m in measured)})
    return {"model": name, "config": spec["args"], "rows": rows, "unavailable": sorted(set(unavailable)),
            "ik_f16_against_mainline": ik_check, "runtime_unchanged": runtime_unchanged(artifacts[8])}


def table(result: dict, machine: dict) -> str:
    lines = [f"### {result['model']}", "", machine_line(machine), "",
             ("| system | weights MiB | prefill tok/s | decode tok/s | peak RSS MiB | read/token MiB | "
             "of bandwidth limit |"), "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['system']} | {row['bytes'] / 2**20:.0f} | {row['prefill_tok_s']:.0f} | "
                     f"{row['decode_tok_s']:.1f} | {row['peak_rss_mb']:.0f} | "
                     + (f"{row['active_bytes'] / 2**20:.1f} | {row['bandwidth_fraction']:.0%} |" if row["active_bytes"]
                        else "n/a | n/a |"))
    lines += [f"\n{line}" for line in result["unavailable"]]
    if (ik := result.get("ik_f16_against_mainline")) is not None:
        verdict = "computes the model as mainline does" if ik["mean_kld"] < IK_SAME_MODEL_KLD else \
            "computes ANOTHER model here: its rows are speed, not this model's"
        lines.append(f"\nik_llama.cpp's F16 against mainline's on mainline's tokens: {ik['mean_kld']:.2e} nats "
                     f"mean KL, top token agreeing {ik['same_top_pct']:.1f}%: it {verdict}")
    check = result["runtime_unchanged"]
    lines.append(f"\n8-bit artifact, moec's runtime (IO binding, tuned session options) vs plain onnxruntime: "
                 f"{check['tokens']} greedy tokens {'identical' if check['identical'] else 'DIFFERENT'}, "
                 f"max |logit diff| {check['max_abs_logit_diff']:.2e}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/moec-compare", type=Path)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--threads", default=2, type=int)
    parser.add_argument("--prompt-len", default=128, type=int)
    parser.add_argument("--gen-len", default=64, type=int)
    parser.add_argument("--repeats", default=3, type=int, help="runs per measurement (the median is kept)")
    parser.add_argument("--rounds", default=2, type=int,
                        help="measurements of every system, round-robin (the fastest is kept)")
    parser.add_argument("--samples", default=16, type=int, help="calibration windows of 256 tokens")
    parser.add_argument("--llama-tools", type=Path, help="folder with llama.cpp's llama-bench: adds its own timing "
                        "of the same GGUFs")
    parser.add_argument("--ik-tools", type=Path, help="folder with ik_llama.cpp's llama-bench and llama-quantize: "
                        "adds ik_llama.cpp's quants")
    parser.add_argument("--only", metavar="REGEX", help="time only the systems whose name matches (e.g. "
                        "'moec 2.5|Q3_K_S, llama|IQ3'); the others are still built")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    args = parser.parse_args()
    names = args.models.split(",")
    if unknown := [n for n in names if n not in MODELS]:
        sys.exit(f"unknown model {unknown[0]!r}; choose from {', '.join(MODELS)}")
    args.bandwidth = read_bandwidth(args.threads)
    models = [compare(name, args) for name in names]
    for result in models:  # every fraction against the highest bandwidth read in the whole run
        for row in result["rows"]:
            if row["active_bytes"]:
                row["bandwidth_limit_tok_s"] = args.bandwidth / row["active_bytes"]
                row["bandwidth_fraction"] = row["decode_tok_s"] / row["bandwidth_limit_tok_s"]
    results = {"machine": machine(args), "models": models}
    (args.workdir / "results.json").write_text(json.dumps(results, indent=1))
    if args.json:
        print(json.dumps(results, indent=1))
        return
    print(f"\nprompt {args.prompt_len}, {args.gen_len} decoded tokens, median of {args.repeats} (llama-bench: "
          f"mean), fastest of {args.rounds} rounds\n")
    print("\n\n".join(table(r, results["machine"]) for r in results["models"]))


def machine_line(m: dict) -> str:
    return (f"{m['cpu']} (ISA: {' '.join(m['isa']) or 'none of AVX2/AVX-512/VNNI/AMX'}), {m['cores']} cores, "
            f"{m['memory_gib']:.0f} GiB; {m['threads']} threads; read bandwidth {m['read_bandwidth_gb_s']:.1f} GB/s "
            f"with {m['threads']} threads")


def machine(args) -> dict:
    import os

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), [])
    isa = sorted(f for f in flags if f in ("avx2", "avx_vnni", "avx512_vnni") or f.startswith(("avx512", "amx")))
    return {"cpu": cpu, "isa": isa, "cores": os.cpu_count(), "memory_gib": memory / 2**30,
            "read_bandwidth_gb_s": args.bandwidth / 1e9, "threads": args.threads}


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--build":
        build(sys.argv[2], Path(sys.argv[3]))
    else:
        main()
