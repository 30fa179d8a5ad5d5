"""llama.cpp side of the benchmark: GGUF conversion and quantization, speed and memory, active bytes.

Everything goes through llama-cpp-python (pip install llama-cpp-python, which builds llama.cpp from source):
its ctypes binding quantizes and runs the models, and its sdist carries the matching llama.cpp converter
(convert_hf_to_gguf.py with its conversion/ package and bundled gguf-py; PyPI's gguf is too old for it),
fetched with pip and unpacked into the work folder once.
"""

import ctypes
import json
import logging
import math
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

VERSION = version("llama_cpp_python")  # the converter must come from the llama.cpp that runs the GGUF

# The sample tokenizer is a 2048-token GPT-2 byte-level BPE (ByteLevel pre-tokenizer, use_regex=True), which the
# converter stores through its GPT-2 path; two of its checks stand in the way, so, for this benchmark only, the
# converter runs with them bypassed (this touches the tokenizer metadata only, not the weights or the speed):
# - it names a BPE pre-tokenizer by hashing how it splits a test string and refuses hashes it does not list, as
#   this one's is: the lookup answers "gpt-2", which is what the pre-tokenizer is;
# - for Llama-family models (Mixtral) it first probes for a SentencePiece tokenizer.model, which needs the
#   sentencepiece package just to find out there is none: they go straight to the GPT-2 path the probes end in.
_CONVERT = """
import runpy, sys
from conversion.base import TextModel
from conversion.llama import LlamaModel
TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
LlamaModel.set_vocab = TextModel._set_vocab_gpt2
runpy.run_path(sys.argv.pop(1), run_name="__main__")
"""


def _sources(workdir: Path) -> Path:
    """The llama.cpp folder holding the converter and gguf-py, unpacked from the llama-cpp-python sdist."""
    src = workdir / f"llama.cpp-{VERSION}"
    if src.is_dir():
        return src
    sdist = workdir / f"llama_cpp_python-{VERSION}.tar.gz"
    if not sdist.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={VERSION}", "-d", str(workdir)], check=True)
    prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
    wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
    with tempfile.TemporaryDirectory(dir=workdir) as tmp, tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.removeprefix(prefix).startswith(wanted)]
        tar.extractall(tmp, members=members, filter="data")
        Path(tmp, prefix).rename(src)
    return src


def _timed(step: str, out: Path, make) -> Path:
    """Runs make(tmp) unless out exists; renaming tmp at the end means a half-written file never looks done."""
    if not out.exists():
        tmp = out.with_name(out.name + ".tmp")
        start = time.perf_counter()
        make(tmp)
        tmp.rename(out)
        print(f"llama.cpp {step} {out.name}: {time.perf_counter() - start:.1f} s", flush=True)
    return out


def gguf_files(model_dir: Path, workdir: Path, types=("Q2_K", "Q4_K_M", "Q8_0")) -> dict[str, Path]:
    """Converts a Hugging Face checkpoint to an F16 GGUF and quantizes it to each of `types` (llama.cpp's
    names, e.g. Q4_K_M); returns {"F16": path, type: path, ...}, reusing files made before."""
    import llama_cpp

    workdir.mkdir(parents=True, exist_ok=True)
    src = _sources(workdir)

    def convert(tmp: Path) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), str(src / "gguf-py")])}
        command = [sys.executable, "-c", _CONVERT, str(src / "convert_hf_to_gguf.py"), str(model_dir),
                   "--outfile", str(tmp), "--outtype", "f16"]
        run = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if run.returncode:
            raise RuntimeError(f"convert_hf_to_gguf.py failed:\n{run.stderr[-4000:]}")

    files = {"F16": _timed("convert", workdir / f"{model_dir.name}.F16.gguf", convert)}
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's log, e.g. one line per tensor
    for kind in types:
        def quantize(tmp: Path, kind=kind) -> None:
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
            if llama_cpp.llama_model_quantize(str(files["F16"]).encode(), str(tmp).encode(), ctypes.byref(params)):
                raise RuntimeError(f"llama_model_quantize to {kind} failed")

        files[kind] = _timed("quantize", workdir / f"{model_dir.name}.{kind}.gguf", quantize)
    return files


def measure(gguf: Path, *, prompt_len=128, gen_len=64, threads=2, repeats=3, warmup=1) -> dict:
    """Prefill and greedy-decode speed of llama.cpp on a random prompt, in a fresh process so that its peak RSS
    is llama.cpp's alone: {"prefill_tok_s", "decode_tok_s", "ttft_ms", "peak_rss_mb", "bytes"}, the times being
    medians of `repeats` runs after `warmup` ones."""
    args = {"gguf": str(gguf), "prompt_len": prompt_len, "gen_len": gen_len, "threads": threads, "repeats": repeats,
            "warmup": warmup}
    run = subprocess.run([sys.executable, __file__, json.dumps(args)], check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(run.stdout.splitlines()[-1])


def _measure_here(gguf: str, prompt_len: int, gen_len: int, threads: int, repeats: int, warmup: int) -> dict:
    """measure()'s child: the raw llama_decode / llama_get_logits_ith calls keep Python's per-token cost small."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=gguf, n_threads=threads, n_threads_batch=threads,
                          n_ctx=prompt_len + gen_len + 16, n_batch=prompt_len, verbose=False)
    ctx, n_vocab = llm.ctx, llm.n_vocab()
    memory = llama_cpp.llama_get_memory(ctx)
    # Ids below 2048 are real tokens of the sample tokenizer; the GGUF's larger vocabulary is padding.
    prompt = (llama_cpp.llama_token * prompt_len)(*np.random.default_rng(0).integers(0, 2048, prompt_len).tolist())
    token = (llama_cpp.llama_token * 1)()

    def step(tokens, n: int) -> None:  # evaluates n tokens and puts the greedy next one in `token`
        if llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(tokens, n)):
            raise RuntimeError("llama_decode failed")
        token[0] = int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,)).argmax())

    def once() -> tuple[float, float]:
        llama_cpp.llama_memory_clear(memory, True)
        start = time.perf_counter()
        step(prompt, prompt_len)
        prefilled = time.perf_counter()
        for _ in range(gen_len):  # end-of-sequence is ignored: the weights are random
            step(token, 1)
        return prefilled - start, time.perf_counter() - prefilled

    for _ in range(warmup):
        once()
    prefill, decode = (statistics.median(s) for s in zip(*(once() for _ in range(repeats))))
    from moec.bench import peak_rss_mb
    return {"prefill_tok_s": prompt_len / prefill, "decode_tok_s": gen_len / decode, "ttft_ms": prefill * 1e3,
            "peak_rss_mb": peak_rss_mb(), "bytes": Path(gguf).stat().st_size}


def run_tool(*argv) -> str:
    """Runs one of llama.cpp's (or ik_llama.cpp's) own tools; its stdout, or a RuntimeError whose first line
    names the failure (its first error line: an abort prints a backtrace after it) and the end of its stderr."""
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=False)
    if done.returncode:
        lines = done.stderr.strip().splitlines() or ["no output"]
        reason = next((line for line in lines if re.search(r"unknown model architecture|error", line, re.I)), lines[-1])
        raise RuntimeError(f"{Path(argv[0]).name} failed ({done.returncode}): {reason.strip(' X')}\n"
                           f"{done.stderr[-3000:]}")
    return done.stdout


def kl_base(tools: Path, f16: Path, text: Path, out: Path, chunks: int | None = None) -> Path:
    """Mainline's tokens and logits of `text` (its first `chunks` windows of 256, or all: the file holds every
    logit: 16 windows of a 32,000-token vocabulary take 0.13 GB) by the `llama-perplexity` in `tools`: the base
    that kl_divergence scores any engine's GGUF against (reused when `out` exists)."""
    limit = () if chunks is None else ("--chunks", chunks)
    return _timed("kl base", out, lambda tmp: run_tool(tools / "llama-perplexity", "-m", f16, "-f", text, "-c", 256,
                                                       "-t", 2, *limit, "--kl-divergence-base", tmp))


def kl_divergence(tools: Path, gguf: Path, base: Path) -> dict:
    """`gguf` run by the `llama-perplexity` in `tools` on the base's own tokens: its perplexity rise over the
    base, mean KL divergence (nats) and how often it agrees on the top token. An engine's F16 ~0 nats from
    mainline's computes the model as mainline does."""
    out = run_tool(tools / "llama-perplexity", "-m", gguf, "--kl-divergence-base", base, "--kl-divergence", "-c", 256,
                   "-t", 2)
    log_ratio = float(re.search(r"Mean ln\(PPL\(Q\)/PPL\(base\)\)\s*:\s*(-?[\d.]+)", out)[1])
    return {"rise_pct": round(100 * (math.exp(log_ratio) - 1), 2),
            "mean_kld": float(re.search(r"Mean\s+KLD:\s*(-?[\d.]+)", out)[1]),
            "same_top_pct": float(re.search(r"Same top p:\s*([\d.]+)", out)[1])}


def quantize_with(tools: Path, f16: Path, kind: str, out: Path) -> Path:
    """`f16` quantized to `kind` by the `llama-quantize` in `tools` (reused when `out` exists)."""
    return _timed("quantize", out, lambda tmp: run_tool(tools / "llama-quantize", f16, tmp, kind))


def imatrix_ggufs(f16: Path, tools: Path, calibration: Path, work: Path, kinds, chunks: int | None = None
                  ) -> dict[str, Path]:
    """`f16` quantized to each of `kinds` with an importance matrix from `llama-imatrix` on `calibration`
    (its first `chunks` windows of 256 tokens, or all; the tools in `tools`; every file reused when present)."""
    limit = () if chunks is None else ("--chunks", chunks)
    imatrix = _timed("imatrix", work / "imatrix.gguf",
                     lambda tmp: run_tool(tools / "llama-imatrix", "-m", f16, "-f", calibration, "-o", tmp, "-c", 256,
                                          "--no-ppl", "-t", 2, *limit))
    return {kind: _timed("quantize", work / f"{f16.stem}.{kind}-imatrix.gguf",
                         lambda tmp, kind=kind: run_tool(tools / "llama-quantize", "--imatrix", imatrix, f16, tmp,
                                                         kind))
            for kind in kinds}


# runs llama-bench as its only child, so that the peak RSS of this process's children is llama-bench's
_BENCH = """
import json, resource, subprocess, sys
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(json.dumps({"rc": done.returncode, "stdout": done.stdout, "stderr": done.stderr[-3000:],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def bench_with(tools: Path, gguf: Path, *, prompt_len=128, gen_len=64, threads=2, repeats=3, extra=()) -> dict:
    """The prefill (pp) and decode (tg) tok/s that the `llama-bench` in `tools` reports for `gguf` (the mean of
    its `repeats` runs, as its users quote it), and its process's peak RSS. `extra`: more llama-bench options
    (ik_llama.cpp's `-rtr 1 -fmoe 1`)."""
    argv = [str(tools / "llama-bench"), "-m", str(gguf), "-p", str(prompt_len), "-n", str(gen_len), "-t", str(threads),
            "-r", str(repeats), "-o", "json", *extra]
    run = json.loads(subprocess.run([sys.executable, "-c", _BENCH, *argv], capture_output=True, text=True,
                                    check=True).stdout)
    if run["rc"]:
        raise RuntimeError(f"llama-bench failed ({run['rc']}):\n{run['stderr']}")
    tests = json.loads(run["stdout"])
    speed = {("prefill" if t["n_gen"] == 0 else "decode"): float(t["avg_ts"]) for t in tests}
    return {"prefill_tok_s": speed["prefill"], "decode_tok_s": speed["decode"], "peak_rss_mb": run["peak_rss_mb"],
            "bytes": gguf.stat().st_size}


def active_bytes(gguf: Path, top_k: int, num_experts: int) -> int:
    """Weight bytes read per decoded token: all tensors, but the stacked experts (*_exps.*) at top_k/num_experts
    and one row of the token embedding. The bundled gguf-py is found next to the GGUF (gguf_files' workdir)."""
    gguf_py = str(_sources(gguf.parent) / "gguf-py")
    if gguf_py not in sys.path:
        sys.path.insert(0, gguf_py)
    from gguf import GGUFReader

    total = 0
    for tensor in GGUFReader(gguf).tensors:
        if "_exps." in tensor.name:
            total += tensor.n_bytes * top_k // num_experts
        elif tensor.name == "token_embd.weight":
            total += tensor.n_bytes * int(tensor.shape[0]) // tensor.n_elements
        else:
            total += tensor.n_bytes
    return total


if __name__ == "__main__":  # measure()'s child process
    print(json.dumps(_measure_here(**json.loads(sys.argv[1]))))
