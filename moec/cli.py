"""The `moec` command: a thin layer over the moec API.

Heavy imports (torch, transformers) happen inside the commands that need them, so the
runtime commands (run, inspect) start quickly and never load PyTorch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import moec
from moec.errors import MoecError
from moec.quant import GRIDS


def _quiet_onnxruntime() -> None:
    """onnxruntime's warnings are hints for graph authors (e.g. that the optional inputs
    logits_to_keep and prune_experts are not constant-folded), noise for someone running a command."""
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)


def _show_progress(args) -> bool:
    """Progress bars on a terminal, unless --quiet; a log or a pipe gets only the result lines."""
    return not args.quiet and sys.stderr.isatty()


def _compile(args) -> None:
    from moec.pipeline import compile as compile_model

    _quiet_onnxruntime()
    record = compile_model(_model_to_compile(args.model_dir, args.plan), args.out, plan=args.plan, force=args.force, target=args.target,
                           data=args.data, samples=args.samples, seq_len=args.seq_len, progress=_show_progress(args))
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        size = record["bytes"]["total"] / 2**20
        check = record["verification"]
        quantization = record["quantization"]
        bits = f", {quantization['avg_expert_bits']:.2f} avg expert bits" if quantization else ""
        print(f"wrote {args.out}: {size:.2f} MiB, {len(record['moe_layers'])} MoE layers{bits}, "
              f"max logit diff vs {check['against']} {check['max_abs_logit_diff']:.2e} "
              f"(prefill and {len(check['steps']) - 1} cached decode steps)")


def _model_to_compile(model_dir: str | None, plan: str | None) -> str:
    """MODEL_DIR, or the model the plan names (its `model` field); both given must agree."""
    from pathlib import Path

    from moec.planner import load_plan

    if plan is None:
        if model_dir is None:
            raise MoecError("compile needs MODEL_DIR, or --plan plan.json naming its model")
        return model_dir
    named = load_plan(plan)["model"]
    if model_dir is None:
        if named is None:
            raise MoecError(f"{plan} names no model (its \"model\" field is null): give MODEL_DIR")
        return named
    if named is not None and Path(named).resolve() != Path(model_dir).resolve():
        raise MoecError(f"{plan} was made for {named}, not {model_dir}: give the plan's model or a plan made for it")
    return model_dir


def _run(args) -> None:
    from moec.runtime import Artifact, Tokenizer, generate, stream_text

    _quiet_onnxruntime()
    artifact = Artifact(args.artifact, threads=args.threads, prune=not args.no_prune)
    tokenizer = Tokenizer(args.artifact)
    prompt = tokenizer.encode(args.prompt)
    if not prompt:
        raise MoecError("the prompt encodes to no tokens")
    tokens = (int(step[0]) for step in generate(artifact, [prompt], args.max_new_tokens))
    if args.json:
        ids = list(tokens)
        print(json.dumps({"prompt_ids": prompt, "generated_ids": ids, "text": tokenizer.decode(ids)}))
        return
    sys.stdout.write(args.prompt)
    stream_text(tokenizer, tokens, lambda text: (sys.stdout.write(text), sys.stdout.flush()))
    sys.stdout.write("\n")


def _bench(args) -> None:
    from moec.bench import bench

    _quiet_onnxruntime()
    result = bench(args.artifact, prompt_len=args.prompt_len, gen_len=args.gen_len, threads=args.threads,
                   repeats=args.repeats, warmup=args.warmup, prune=not args.no_prune, data=args.data)
    if args.json:
        print(json.dumps(result))
    else:
        pruned = f", {result['pruned_fraction']:.1%} expert activations pruned" if "pruned_fraction" in result else ""
        print(f"prefill {result['prefill_tok_s']:.1f} tok/s ({result['prompt_len']} tokens, first token after "
              f"{result['ttft_ms']:.1f} ms), decode {result['decode_tok_s']:.1f} tok/s ({result['gen_len']} tokens), "
              f"peak RSS {result['peak_rss_mb']:.0f} MB; median of {result['repeats']}{pruned}")


def _profile(args) -> None:
    from moec.files import write_atomic
    from moec.profile import profile

    _quiet_onnxruntime()
    result = profile(args.artifact, widths=args.bits, threads=args.threads, runs=args.runs,
                     progress=_show_progress(args))
    write_atomic(args.out, (json.dumps(result, indent=1) + "\n").encode())
    if args.json:
        print(json.dumps(result))
        return
    seconds = result["layers"][0]["expert_seconds"]
    print(f"wrote {args.out}: a routed expert's token " + ", ".join(f"{1e3 * t:.3f} ms at {b}" for b, t in
                                                                    seconds.items())
          + f" (layer {result['layers'][0]['layer']}); the rest of a step {1e3 * result['other_seconds']:.2f} ms, "
          f"the artifact's step {1e3 * result['step_seconds']:.2f} ms")


def _calibrate(args) -> None:
    from moec.calibrate import calibrate
    from moec.files import write_atomic

    stats = calibrate(args.model_dir, data=args.data, samples=args.samples, seq_len=args.seq_len,
                      bits=tuple(args.bits), group_size=args.group_size, non_expert=args.non_expert,
                      progress=_show_progress(args))
    write_atomic(args.out, (json.dumps(stats, indent=1) + "\n").encode())
    c = stats["calibration"]
    print(f"wrote {args.out}: {len(stats['layers'])} MoE layers, {c['samples']} x {c['seq_len']} tokens "
          f"from {c['data']}, {c['seconds']:.1f} s")


def _bit_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints like 2,4,8, got {text!r}") from None


def _bit_range(text: str) -> tuple[float, float, float]:
    try:
        start, stop, step = (float(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:STOP:STEP like 2.0:4.0:0.25, got {text!r}") from None
    return start, stop, step


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(text)


def _plan(args) -> None:
    from moec.planner import load_stats, make_plan, plot_sweep, save_plan, sweep, write_sweep_table

    from moec.planner.speed import load_profile

    if args.avg_bits is None and args.size_budget is None and args.sweep is None and args.decode_tok_s is None:
        raise MoecError("give a budget: --avg-bits, --size-budget, --sweep or --decode-tok-s")
    if args.decode_tok_s is not None and args.profile is None:
        raise MoecError("--decode-tok-s needs --profile: the host's decode costs, from moec profile ARTIFACT")
    stats = load_stats(args.stats)
    options = dict(bits=args.bits, scope=args.scope, alpha=args.alpha, beta=args.beta, gamma=args.gamma,
                   require_top_widths=not args.no_top_widths, group_size=args.group_size,
                   params_per_expert=args.params_per_expert, model=args.model, method=args.method,
                   grid=args.grid, layer_prior_tokens=args.layer_prior_tokens, target=args.target,
                   protect_super_experts=not args.no_protect_super_experts, decode_tok_s=args.decode_tok_s,
                   profile=None if args.profile is None else load_profile(args.profile),
                   per_projection=args.per_projection, whole_budget=args.whole_budget)
    if args.sweep:
        if args.prune_target is not None:
            raise MoecError("--prune-target plans one pruning for one plan; it does not combine with --sweep")
        if args.whole_budget:
            raise MoecError("--whole-budget does not combine with --sweep: the sweep's front counts expert bytes")
        rows = sweep(stats, *args.sweep, **options)
        write_sweep_table(rows, args.out)
        if args.plot:
            plot_sweep(rows, args.plot)
        print(f"wrote {args.out}: {len(rows)} Pareto points" + (f", plot {args.plot}" if args.plot else ""))
        return
    if (args.protect_fraction or args.prune_rule != "beta") and args.prune_target is None:
        raise MoecError("--protect-fraction and --prune-rule need --prune-target")
    plan = make_plan(stats, avg_bits=args.avg_bits, size_budget=args.size_budget, **options)
    if args.prune_target is not None:
        from moec.pruning import plan_pruning

        rule = args.prune_rule.replace("-", "_")
        plan["pruning"] = plan_pruning(stats, args.prune_target, args.protect_fraction, rule)
    save_plan(plan, args.out)
    objective = plan["objective"]
    size = objective["predicted_expert_bytes"]
    pruning = plan["pruning"]
    speed = objective.get("predicted_decode_tok_s")
    print(f"wrote {args.out}: predicted loss {objective['predicted_loss']:.6g}"
          + (f", experts {size / 1e9:.3f} GB" if size is not None else "")
          + (f", predicted decode {speed:.1f} tok/s on the profiled host" if speed is not None else "")
          + (f", pruning {len(pruning['layers'])} layers (predicted {pruning['predicted_pruned_fraction']:.3f} "
             "of expert activations)" if pruning else "")
          + (f", {len(plan['super_experts'])} super experts kept at {objective['candidate_bits'][-1]} bits and never "
             "pruned" if plan.get("super_experts") else "")
          + (f", {split} experts with down_proj at its own width" if (split := _split_experts(plan)) else "")
          + (_other_weights(plan) if objective.get("whole_budget") else "")
          + (f", {sum(row.count(0) for row in plan['experts']['bits'] if row)} experts dropped"
             if any(0 in row for row in plan["experts"]["bits"] if row) else ""))


def _other_weights(plan: dict) -> str:
    """What a whole-budget plan gives the weights outside the routed experts."""
    from moec.planner.sizes import _format_bytes

    widths = ", ".join(f"{part} {width}" for part, width in plan["non_expert"].items())
    return f", other weights {_format_bytes(plan['objective']['predicted_non_expert_bytes'])} ({widths})"


def _split_experts(plan: dict) -> int:
    """How many experts the plan gives a down_proj width of its own."""
    down = plan["experts"].get("down_bits") or []
    return sum(a != b for rows in zip(plan["experts"]["bits"], down) if rows[0] for a, b in zip(*rows))


def _eval(args) -> None:
    from moec.evaluate import evaluate

    _quiet_onnxruntime()
    result = evaluate(args.path, args.data, samples=args.samples, seq_len=args.seq_len, threads=args.threads,
                      prune=not args.no_prune)
    if args.json:
        print(json.dumps(result))
    else:
        pruned = (f"; {result['expert_activations']} expert activations, {result['pruned_fraction']:.1%} "
                  f"fewer than top-k (pruning: {result['pruning']})") if "pruned_fraction" in result else ""
        print(f"perplexity {result['perplexity']:.4f} over {result['tokens']} tokens "
              f"({result['runtime']}, {result['data']}){pruned}")


def _inspect(args) -> None:
    from moec.summary import describe, describe_stats, stats_summary, summary

    if os.path.isfile(args.artifact):  # a stats file from moec calibrate
        info = describe_stats(args.artifact)
        print(json.dumps(info, indent=2) if args.json else stats_summary(info))
        return
    info = describe(args.artifact)
    print(json.dumps(info, indent=2) if args.json else summary(info))
    if args.plot:
        from moec.summary import plot

        plot(info, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr if args.json else sys.stdout)
    if args.netron:
        from moec.summary import serve_netron

        host, port = serve_netron(args.artifact, args.port)  # a MoecError if netron is not installed
        import netron

        print(f"netron serves {args.artifact} at http://{host}:{port} (Ctrl-C to stop)", file=sys.stderr)
        netron.wait()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moec", description="Compress Mixture-of-Experts LLMs and compile them to ONNX.")
    parser.add_argument("--version", action="version", version=f"moec {moec.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("compile", help="compile a Hugging Face MoE checkpoint to an ONNX artifact",
                            description="Trace MODEL_DIR (a local Hugging Face folder with safetensors "
                                        "weights) to ONNX and write an artifact folder for onnxruntime. With "
                                        "--plan, MODEL_DIR defaults to the model the plan names.")
    p.add_argument("model_dir", metavar="MODEL_DIR", nargs="?", help="the model folder (default: the plan's model)")
    p.add_argument("--out", required=True, metavar="DIR", help="artifact folder to write")
    p.add_argument("--plan", metavar="plan.json", help="quantize to this plan's bit widths (moec plan)")
    p.add_argument("--target", default="cpu", help="execution target: cpu, or cuda for onnxruntime-gpu (default: cpu)")
    p.add_argument("--data", metavar="FILE.txt",
                   help="calibration text for a GPTQ or weighted-grid plan's experts (default: built-in corpus)")
    p.add_argument("--samples", type=_positive_int, default=64, metavar="N",
                   help="their calibration sequences (default 64)")
    p.add_argument("--seq-len", type=_positive_int, default=256, metavar="L", help="tokens per sequence (default 256)")
    p.add_argument("--force", action="store_true", help="replace DIR if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the build record as JSON")
    p.set_defaults(func=_compile)

    p = commands.add_parser("run", help="generate text with an artifact (greedy, streaming)",
                            description="Greedy generation with the KV cache in onnxruntime.")
    p.add_argument("artifact", metavar="DIR")
    p.add_argument("--prompt", required=True, metavar="TEXT")
    p.add_argument("--max-new-tokens", type=_positive_int, default=64, metavar="N")
    p.add_argument("--threads", type=_positive_int, default=None, metavar="N", help="onnxruntime intra-op threads")
    p.add_argument("--no-prune", action="store_true",
                   help="run a dynamically pruned artifact with pruning off (no recompile)")
    p.add_argument("--json", action="store_true", help="print prompt/generated ids and text as JSON")
    p.set_defaults(func=_run)

    p = commands.add_parser("bench", help="measure an artifact's prefill and decode speed and memory",
                            description="Prefill tokens/s, decode tokens/s, time to first token and peak RSS "
                                        "of an artifact in onnxruntime: warm-up, then the median of repeats.")
    p.add_argument("artifact", metavar="DIR")
    p.add_argument("--prompt-len", type=_positive_int, default=128, metavar="N", help="prompt tokens (default 128)")
    p.add_argument("--gen-len", type=_positive_int, default=64, metavar="N", help="decoded tokens (default 64)")
    p.add_argument("--threads", type=_positive_int, default=None, metavar="N", help="onnxruntime intra-op threads")
    p.add_argument("--repeats", type=_positive_int, default=5, metavar="N", help="timed runs (default 5)")
    p.add_argument("--warmup", type=int, default=1, metavar="N", help="untimed runs first (default 1)")
    p.add_argument("--no-prune", action="store_true", help="run a dynamically pruned artifact with pruning off")
    p.add_argument("--data", metavar="FILE.txt",
                   help="prompt with this text's first tokens and decode its next ones (teacher-forced), so experts "
                        "are routed as on it (default: a random prompt, greedy decoding)")
    p.add_argument("--json", action="store_true", help="print one JSON object (prefill_tok_s, decode_tok_s, ...)")
    p.set_defaults(func=_bench)

    p = commands.add_parser("profile", help="time this host's decode step of an artifact's shape, per expert width",
                            description="Time, on this host, one routed expert's decode token at each width in "
                                        "an artifact's shape (lowered as its target lowers it) and the rest of "
                                        "its decode step; `moec plan --profile FILE --decode-tok-s N` plans to it.")
    p.add_argument("artifact", metavar="DIR", help="a compiled CPU artifact (any plan) of the model to plan")
    p.add_argument("--bits", type=_bit_list, metavar="LIST",
                   help="widths to time (default: 2,3,4,8 and the artifact's own)")
    p.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="onnxruntime intra-op threads (default: one per core, the artifact's setting)")
    p.add_argument("--runs", type=_positive_int, default=50, metavar="N", help="timed tokens per width (default 50)")
    p.add_argument("--out", required=True, metavar="FILE", help="profile.json to write")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="also print the profile as JSON")
    p.set_defaults(func=_profile)

    p = commands.add_parser("calibrate", help="measure each expert's importance on calibration text",
                            description="Stream MODEL_DIR layer by layer over calibration text and record, "
                                        "per expert, activation frequency, routing weight and quantization "
                                        "loss per bit width (moec-stats/1 JSON for `moec plan`).")
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.add_argument("--data", metavar="FILE.txt", help="UTF-8 calibration text (default: built-in corpus)")
    p.add_argument("--samples", type=_positive_int, default=64, metavar="N", help="sequences (default 64)")
    p.add_argument("--seq-len", type=_positive_int, default=256, metavar="L", help="tokens per sequence (default 256)")
    p.add_argument("--bits", type=_bit_list, default=[2, 4, 8], metavar="LIST",
                   help="widths to measure quantization loss at (default 2,4,8; the paper's: 1,2,3); 0 measures "
                        "dropping each expert (the MoE block rerun with it masked out of the router)")
    p.add_argument("--group-size", type=_positive_int, default=128, metavar="N",
                   help="quantization block along the input dimension (default 128)")
    p.add_argument("--non-expert", action="store_true",
                   help="also measure the loss of attention, shared experts, dense MLPs and the embedding on the "
                        "experts' scale, for `moec plan --whole-budget` (reruns each layer once per such part "
                        "and width)")
    p.add_argument("--out", required=True, metavar="FILE", help="stats.json to write")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_calibrate)

    p = commands.add_parser("plan", help="choose expert bit widths from calibration statistics (MC-MoE)",
                            description="Solve MC-MoE's bit allocation (arXiv 2410.06270) for a stats file and "
                                        "write plan.json, or sweep budgets and write the Pareto front.")
    p.add_argument("--stats", required=True, metavar="FILE", help="moec-stats/1 JSON")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--avg-bits", type=float, metavar="B", help="average bits per expert weight")
    budget.add_argument("--size-budget", metavar="SIZE",
                        help="bytes for all routed experts, e.g. 12GB, 800MB, 11.5GiB (global scope)")
    budget.add_argument("--sweep", type=_bit_range, metavar="START:STOP:STEP",
                        help="plan every avg-bits budget in the range; --out gets the Pareto table "
                             "(TSV, or markdown if it ends in .md)")
    p.add_argument("--decode-tok-s", type=float, metavar="N",
                   help="decode speed the plan must reach on the profiled host (with --profile); alone, or beside "
                        "--avg-bits / --size-budget")
    p.add_argument("--profile", metavar="FILE",
                   help="the host's decode costs (moec profile ARTIFACT): the plan predicts its decode speed")
    p.add_argument("--bits", type=_bit_list, metavar="LIST",
                   help="candidate widths, e.g. 2,3,4 (default: every width in the stats but 0); 0 lets the "
                        "solver drop experts (no weights, never routed to), if the stats measured it")
    p.add_argument("--per-projection", action="store_true",
                   help="an expert's down_proj may take another width than its gate and up (global scope; "
                        "stats from a moec calibrate that measured each projection's loss)")
    p.add_argument("--scope", choices=("global", "layer"), default="global",
                   help="global: one byte budget, layers compete (default); layer: the paper's per-layer budget")
    p.add_argument("--whole-budget", action="store_true",
                   help="the budget also pays for attention, shared experts, dense MLPs and the embedding, whose "
                        "widths the solver picks too, all weighed by their squared output error relative to the "
                        "residual stream (stats from moec calibrate --non-expert); --avg-bits keeps the size of the "
                        "plan without it")
    p.add_argument("--alpha", type=float, default=None,
                   help="frequency and loss exponent (default 1; 0 with --whole-budget)")
    p.add_argument("--beta", type=float, default=None, help="routing-weight exponent (default 1.5; 0 with --whole-budget)")
    p.add_argument("--gamma", type=float, default=None,
                   help="loss exponent (default: alpha, as in MC-MoE's solver; 2 with --whole-budget)")
    p.add_argument("--no-top-widths", action="store_true",
                   help="drop the constraint of one expert per layer at each of the two highest widths")
    p.add_argument("--group-size", type=int, default=128, metavar="N", help="quantization group size (default 128)")
    p.add_argument("--method", choices=("rtn", "gptq"), default="rtn",
                   help="expert quantizer compile uses: round-to-nearest, or GPTQ on each expert's routed "
                        "calibration tokens (default rtn)")
    p.add_argument("--grid", choices=GRIDS, default=None,
                   help="each group's scale and zero point: minmax spans its range; weighted searches clipped "
                        "ranges for the least error weighted by each input's calibration second moment "
                        "(compile then reads calibration text for the experts) (default: weighted for gptq, "
                        "minmax for rtn, as measured)")
    p.add_argument("--layer-prior-tokens", type=_count, default=None, metavar="N",
                   help="GPTQ's Hessian (or the weighted grid's second moments) of each expert also counts the "
                        "layer's, from all its calibration tokens, as N tokens: steadier for rarely routed experts "
                        "(default: 256 for gptq, 0 for rtn, as measured)")
    p.add_argument("--params-per-expert", type=int, metavar="N",
                   help="weights per routed expert (default: 3*hidden*intermediate from the stats or --model)")
    p.add_argument("--model", metavar="PATH", help="model the plan is for; refused if the stats are for another")
    p.add_argument("--target", choices=("cpu", "cuda"), default=None,
                   help="count sizes as this target stores them (cpu: 1-bit in 2-bit and 3-bit in 4-bit "
                        "containers; cuda: 2-bit in 4-bit, float16 scales); default: every width packed as planned")
    p.add_argument("--prune-target", type=float, metavar="F",
                   help="also plan dynamic pruning: remove this fraction of expert activations (e.g. 0.15), "
                        "from the least sensitive layers")
    p.add_argument("--prune-rule", choices=("beta", "top-p"), default="beta",
                   help="with --prune-target: MC-MoE's rule (drop experts under beta x the top-1 weight; default) "
                        "or top-p (keep the fewest top experts whose weight reaches p of the token's top-k)")
    p.add_argument("--no-protect-super-experts", action="store_true",
                   help="plan the stats' super experts like any other (default: highest width, never pruned)")
    p.add_argument("--protect-fraction", type=float, default=0.0, metavar="P",
                   help="with --prune-target: the most important fraction of prefill tokens keeps all its "
                        "experts (default 0)")
    p.add_argument("--plot", metavar="FILE.png", help="with --sweep: also plot the front (needs matplotlib)")
    p.add_argument("--out", required=True, metavar="FILE", help="plan.json to write (or the table, with --sweep)")
    p.set_defaults(func=_plan)

    p = commands.add_parser("eval", help="perplexity of an artifact or of the source model on text",
                            description="Perplexity on the same token windows of FILE.txt, through onnxruntime "
                                        "for an artifact folder or PyTorch for a model folder.")
    p.add_argument("path", metavar="DIR", help="artifact folder, or Hugging Face model folder")
    p.add_argument("--data", required=True, metavar="FILE.txt", help="UTF-8 evaluation text")
    p.add_argument("--samples", type=_positive_int, default=32, metavar="N", help="windows (default 32)")
    p.add_argument("--seq-len", type=_positive_int, default=256, metavar="L", help="tokens per window (default 256)")
    p.add_argument("--threads", type=_positive_int, default=None, metavar="N", help="onnxruntime intra-op threads")
    p.add_argument("--no-prune", action="store_true",
                   help="run a dynamically pruned artifact with pruning off (no recompile)")
    p.add_argument("--json", action="store_true", help="print one JSON object (perplexity, tokens, ...)")
    p.set_defaults(func=_eval)

    p = commands.add_parser("inspect", help="summarise an artifact (or a stats file)",
                            description="Architecture, layers, experts and sizes of an artifact; or, for a "
                                        "stats.json from moec calibrate, what it measured and its super experts.")
    p.add_argument("artifact", metavar="DIR", help="artifact folder, or stats.json")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="draw the bits per expert and the size breakdown (matplotlib)")
    p.add_argument("--netron", action="store_true", help="serve the graph in netron on localhost (the netron extra)")
    p.add_argument("--port", type=_positive_int, default=8080, help="port for --netron (default 8080)")
    p.set_defaults(func=_inspect)
    return parser


def _one_line_warnings(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning):
    """moec's own warnings as `moec: warning: …` lines; others as Python shows them."""
    from moec.checkpoint import UntestedTransformers

    if issubclass(category, UntestedTransformers):
        print(f"moec: warning: {message}", file=sys.stderr)
    else:
        _default(message, category, filename, lineno, file, line)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.showwarning = _one_line_warnings
    try:
        args.func(args)
    except MoecError as e:
        print(f"moec: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moec: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
