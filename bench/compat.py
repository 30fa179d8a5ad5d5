"""Does moec follow a transformers release? The family tests in a throwaway venv with that version.

Makes a venv in a temporary folder, installs moec there as the README does (through the lock,
constraints.txt), then the given transformers as docs/compatibility.md tells a user to, runs
tests/test_families.py (every supported type against transformers in prefill and cached decode,
every refused type refused with a reason code) and prints one row per model type:

    matches    every test of the type passed
    refused    compile refused it with moec.errors.Unsupported (the reason code in brackets)
    fails      a test of the type failed (the first failure's test and message)

    python bench/compat.py --transformers 5.25.0 [--keep DIR] [--json] [-- PYTEST ARGS]

The venv is removed afterwards unless --keep names a folder for it. Exit status 1 when a type fails.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "constraints.txt"
FAMILY_TESTS = "tests/test_families.py"
# a supported type whose compile is refused fails in the `compiled` fixture with this message
# (tests/conftest.py)
REFUSED_IN_FIXTURE = re.compile(r"refused \((\w+)\)")


def install(venv: Path, version: str) -> None:
    """The README's install through the lock, then the release as a user overrides it (pip warns
    that moec's range excludes a version it has not been tested with, and installs it)."""
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([*pip, "-c", str(LOCK), "torch==2.13.0", "-e", f"{ROOT}[test]"], check=True, stdout=sys.stderr)
    subprocess.run([*pip, f"transformers=={version}"], check=True, stdout=sys.stderr)


def run_family_tests(venv: Path, pytest_args: list[str]) -> Path:
    report = venv / "families.xml"
    subprocess.run([str(venv / "bin" / "python"), "-m", "pytest", FAMILY_TESTS, "-q", "-p", "no:cacheprovider",
                    f"--junitxml={report}", *pytest_args], cwd=ROOT, stdout=sys.stderr)
    return report


def table(report: Path) -> list[dict]:
    """One row per model type from the junit report of the family tests."""
    rows: dict[str, dict] = {}
    for case in ET.parse(report).iter("testcase"):
        found = re.search(r"\[([a-z0-9_]+)(?:-[^\]]*)?\]$", case.get("name", ""))
        if found is None:
            continue
        row = rows.setdefault(found[1], {"type": found[1], "result": "matches", "detail": "", "tests": 0})
        row["tests"] += 1
        refused = next((p.get("value") for p in case.iter("property") if p.get("name") == "refused"), None)
        problem = next((e for e in case if e.tag in ("failure", "error")), None)
        if problem is not None and row["result"] != "fails":
            message = (problem.get("message") or problem.text or "").strip().splitlines()
            first = message[0][:200] if message else problem.tag
            in_fixture = REFUSED_IN_FIXTURE.search(first)
            if in_fixture and row["result"] == "matches":
                row.update(result="refused", detail=f"[{in_fixture[1]}] compile refused a supported type: {first}")
            elif not in_fixture:
                row.update(result="fails", detail=f"{case.get('name')}: {first}")
        elif refused is not None and row["result"] == "matches":
            row.update(result="refused", detail=f"[{refused}]")
    return sorted(rows.values(), key=lambda r: (("fails", "refused", "matches").index(r["result"]), r["type"]))


def markdown(rows: list[dict], version: str) -> str:
    counts = {kind: sum(r["result"] == kind for r in rows) for kind in ("matches", "refused", "fails")}
    lines = [f"transformers {version}: {counts['matches']} match, {counts['refused']} refused, "
             f"{counts['fails']} fail", "", "| type | result | detail |", "|---|---|---|"]
    lines += [f"| {r['type']} | {r['result']} | {r['detail'].replace('|', '/')} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transformers", required=True, metavar="VERSION", help="the release to try, e.g. 5.25.0")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="make the venv here and keep it")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    args = parser.parse_args()
    if not re.fullmatch(r"\d+(\.\d+)*(\.?(a|b|rc|dev)\d+)?", args.transformers):
        parser.error(f"--transformers {args.transformers!r} is not a version number")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="moec-compat-") as scratch:
        venv = args.keep or Path(scratch) / "venv"
        try:
            install(venv, args.transformers)
        except subprocess.CalledProcessError:
            sys.exit(f"compat: could not install transformers=={args.transformers} with moec's lock")
        rows = table(run_family_tests(venv, args.pytest_args))
    print(f"({time.perf_counter() - start:.0f} s, python {sys.version.split()[0]})", file=sys.stderr)
    print(json.dumps(rows, indent=2) if args.json else markdown(rows, args.transformers))
    sys.exit(1 if any(r["result"] == "fails" for r in rows) else 0)


if __name__ == "__main__":
    main()
