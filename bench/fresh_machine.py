"""What a fresh machine costs: `make demo` against an empty project cache, split by step.

    .venv/bin/python bench/fresh_machine.py --label warm-go-pip     # runs make demo, new empty cache
    .venv/bin/python bench/fresh_machine.py --from-log make-demo.log --label fresh   # parse a log

Runs `make demo` in this checkout with DIFFUSION_OPERATOR_CACHE pointing at a new empty folder (the
Go build, Go module and pip caches stay as they are: a machine that built the project before), or
reads the log of a `make demo` run elsewhere (a fresh clone on a machine that never ran it). Parses
the lines the bootstrap and the demo print (`==> [bootstrap Ns]`, `[build] X: done in Ns`, the
image summary lines, the demo's `Image written ... (total ...; {timings})`) and writes
`bench/results/fresh_machine_<label>.json` plus a Markdown table. The baseline is the warm run in the
same invocation: with `--warm`, `make demo` runs again on the cache just filled.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"

BOOT = re.compile(r"^==> \[bootstrap\s+(\d+)s\] (.*)$")
GO = re.compile(r"^\[build\] ([\w-]+): done in (\d+)s$")
GO_ALL = re.compile(r"^\[build\] all binaries ready in (\d+)s$")
IMAGE = re.compile(r"^\s*(operator|runtime): \S+ \(built in (\d+)s; ([\d.]+) GB\)$")
BASE = re.compile(r"base built in (\d+)s")
IMPORT = re.compile(r"^\[images\] (operator|runtime): imported into the node in (\d+)s$")
PIP = re.compile(r"python packages installed in (\d+)s")
IMAGES_READY = re.compile(r"images ready \((\d+)s since they started\)")
DEMO = re.compile(r"^Image written to .* \(total ([\d.]+)s; (\{.*\})\)$")
TOTAL = re.compile(r"^make demo: (\d+(?:\.\d+)?)s rc=(\d+)$|^rc=(\d+) total=(\d+)s$")


def parse(log: str) -> dict:
    out: dict = {"go_modules": {}, "images": {}, "imports": {}, "bootstrap_lines": []}
    for line in log.splitlines():
        if m := BOOT.match(line):
            out["bootstrap_lines"].append({"at_s": int(m[1]), "line": m[2]})
            if m[2] == "done":
                out["bootstrap_s"] = int(m[1])
        if m := PIP.search(line):
            out["pip_s"] = int(m[1])
        if m := GO.match(line):
            out["go_modules"][m[1]] = int(m[2])
        if m := GO_ALL.match(line):
            out["go_all_s"] = int(m[1])
        if m := BASE.search(line):
            out["images"]["base"] = {"built_s": int(m[1])}
        if m := IMAGE.match(line):
            out["images"][m[1]] = {"built_s": int(m[2]), "size_gb": float(m[3])}
        if m := IMAGES_READY.search(line):
            out["images_s"] = int(m[1])
        if m := IMPORT.match(line):
            out["imports"][m[1]] = int(m[2])
        if m := DEMO.match(line):
            out["demo_s"] = float(m[1])
            out["demo_steps"] = json.loads(m[2])
        if m := TOTAL.match(line):  # this script's line, or `rc=N total=Ns` of a shell wrapper
            out["total_s"], out["rc"] = (float(m[1]), int(m[2])) if m[1] else (float(m[4]), int(m[3]))
    return out


def run_make_demo(cache: Path, log_path: Path) -> str:
    env = dict(os.environ, DIFFUSION_OPERATOR_CACHE=str(cache))
    start = time.monotonic()
    with open(log_path, "w") as fh:
        proc = subprocess.Popen(["make", "demo"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip
        assert proc.stdout is not None
        for line in proc.stdout:  # progress as it comes
            sys.stdout.write(line)
            fh.write(line)
        rc = proc.wait()
        fh.write(f"make demo: {time.monotonic() - start:.1f}s rc={rc}\n")
    return log_path.read_text()


def table(label: str, r: dict) -> str:
    rows = [f"| step ({label}) | seconds |", "| --- | --- |"]
    if "pip_s" in r:
        rows.append(f"| pip install (venv) | {r['pip_s']} |")
    if "go_all_s" in r:
        mods = ", ".join(f"{k} {v}" for k, v in r["go_modules"].items())
        rows.append(f"| Go binaries (`diffusion-dev build`: {mods}) | {r['go_all_s']} |")
    if "images_s" in r:
        imgs = ", ".join(f"{k} {v['built_s']}" for k, v in r["images"].items())
        rows.append(f"| images, beside the Go build (buildah: {imgs}) | {r['images_s']} |")
    if "bootstrap_s" in r:
        rows.append(f"| bootstrap in all | {r['bootstrap_s']} |")
    if "demo_s" in r:
        steps = ", ".join(f"{k} {v}" for k, v in r["demo_steps"].items() if k != "total")
        rows.append(f"| demo ({steps}) | {r['demo_s']} |")
    if "total_s" in r:
        rows.append(f"| **make demo** | **{r['total_s']:.0f}** |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--label", required=True, help="result name: bench/results/fresh_machine_<label>.json")
    ap.add_argument(
        "--from-log", type=Path, nargs="+", help="parse these logs (make demo's, the images log) instead"
    )
    ap.add_argument("--note", default="", help="what machine / caches the run had")
    ap.add_argument("--warm", action="store_true", help="then run make demo again on the filled cache")
    args = ap.parse_args()
    runs: dict[str, dict] = {}
    if args.from_log:
        runs["cold"] = parse("\n".join(p.read_text() for p in args.from_log))
    else:
        with tempfile.TemporaryDirectory(prefix="diffusion-fresh-") as work:
            cache = Path(work) / "cache"
            runs["cold"] = parse(run_make_demo(cache, Path(work) / "cold.log"))
            if args.warm:
                runs["warm"] = parse(run_make_demo(cache, Path(work) / "warm.log"))
            subprocess.run(["rm", "-rf", str(cache)], check=False)
    result = {"label": args.label, "note": args.note, "nproc": os.cpu_count(), "runs": runs}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"fresh_machine_{args.label}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    for name, r in runs.items():
        print(table(f"{args.label}, {name}", r))
    print(f"written {out.relative_to(REPO)}")
    return 0 if all(r.get("rc", 0) == 0 for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
