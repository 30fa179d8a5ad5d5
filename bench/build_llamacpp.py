"""Build llama.cpp's (or ik_llama.cpp's) own tools natively for this host: llama-bench,
llama-quantize, llama-imatrix and llama-perplexity, CPU backend only, with cmake.

    python bench/build_llamacpp.py SOURCE [--out BUILD] [--no-amx] [--jobs N]

SOURCE is a llama.cpp tree: the llama-cpp-python sdist's vendor/llama.cpp (the same llama.cpp the
bench's Python binding runs; `--sdist` fetches and unpacks it) or an ik_llama.cpp checkout. Prints
the folder holding the binaries (BUILD/bin). GGML_NATIVE=ON compiles for this CPU's ISA; `--no-amx`
(for hosts where mainline ggml's AMX kernels crash, as on the Intel VM of docs/measurements.md) builds
for each ISA extension /proc/cpuinfo lists but AMX instead. ik_llama.cpp has no AMX backend and its
iqk kernels assume the AVX-512 subsets that -march=native brings: build it without `--no-amx`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
from pathlib import Path

TOOLS = ("llama-bench", "llama-quantize", "llama-imatrix", "llama-perplexity")


def sdist_source(version: str, workdir: Path) -> Path:
    """vendor/llama.cpp of the llama-cpp-python `version` sdist, fetched with pip and unpacked once."""
    src = workdir / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if src.is_dir():
        return src
    workdir.mkdir(parents=True, exist_ok=True)
    sdist = workdir / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={version}", "-d", str(workdir)], check=True)
    with tarfile.open(sdist) as tar:
        tar.extractall(workdir, filter="data")
    return src


# /proc/cpuinfo flag -> ggml's cmake option, for a build without AMX
ISA_OPTIONS = {"avx": "AVX", "avx2": "AVX2", "fma": "FMA", "f16c": "F16C", "bmi2": "BMI2", "avx_vnni": "AVX_VNNI",
               "avx512f": "AVX512", "avx512vbmi": "AVX512_VBMI", "avx512_vnni": "AVX512_VNNI",
               "avx512_bf16": "AVX512_BF16"}


def isa_options(amx: bool) -> list[str]:
    """GGML_NATIVE, or (without AMX) each extension this CPU has, switched on by name."""
    if amx:
        return ["-DGGML_NATIVE=ON"]
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), [])
    return ["-DGGML_NATIVE=OFF", *(f"-DGGML_{option}={'ON' if flag in flags else 'OFF'}"
                                   for flag, option in ISA_OPTIONS.items()),
            "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]


def build(source: Path, out: Path, amx: bool = True, jobs: int | None = None) -> Path:
    """Configure and build TOOLS; returns the folder of the binaries."""
    options = [*isa_options(amx), "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF",
               "-DGGML_CUDA=OFF", "-DCMAKE_BUILD_TYPE=Release"]
    subprocess.run(["cmake", "-S", str(source), "-B", str(out), "-G", "Ninja", *options], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(out), "-j", str(jobs or os.cpu_count() or 1), "--target", *TOOLS],
                   check=True, stdout=subprocess.DEVNULL)
    return out / "bin"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?", type=Path, help="a llama.cpp or ik_llama.cpp tree")
    parser.add_argument("--sdist", metavar="VERSION", help="build the llama-cpp-python VERSION sdist's llama.cpp")
    parser.add_argument("--out", type=Path, help="build folder (default: SOURCE/build-bench)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/moec-llamacpp"), help="where --sdist unpacks")
    parser.add_argument("--no-amx", action="store_true")
    parser.add_argument("--jobs", type=int)
    args = parser.parse_args()
    if (args.source is None) == (args.sdist is None):
        parser.error("give a SOURCE tree or --sdist VERSION")
    source = args.source or sdist_source(args.sdist, args.workdir)
    print(build(source, args.out or source / "build-bench", amx=not args.no_amx, jobs=args.jobs))


if __name__ == "__main__":
    main()
