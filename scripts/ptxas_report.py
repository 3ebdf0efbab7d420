#!/usr/bin/env python3
"""Registers, shared memory and spills of every CUDA kernel, per architecture, from ptxas -v.

Re-runs the exact nvcc commands of the CMake build (build/*/cmake, so build once first) with -Xptxas=-v
and prints one line per kernel; `--out FILE` also writes the table as Markdown. Spills to local memory
are what to look for: any kernel that spills is listed first and the exit code is 1 with `--strict`.

    python scripts/ptxas_report.py [--filter attention] [--arch sm_90a] [--out benchmarks/results/ptxas.md]
"""

import argparse
import glob
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build_dir() -> Path:
    dirs = sorted(glob.glob(str(ROOT / "build" / "cmake-*")))
    if not dirs:
        sys.exit("no CMake build directory under build/: build the extension first")
    return Path(dirs[-1])


def nvcc_commands(bdir: Path) -> list[str]:
    out = subprocess.run(["ninja", "-t", "commands"], cwd=bdir, capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if "nvcc" in line and " -x cu " in line]


def demangle(names: list[str]) -> list[str]:
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout
    return out.splitlines()


def parse(text: str) -> list[dict]:
    kernels, current = [], None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(\S+)'", line)
        if m:
            current = {"kernel": m.group(1), "arch": m.group(2), "registers": 0, "smem": 0, "spill_st": 0, "spill_ld": 0, "stack": 0}
            kernels.append(current)
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current["stack"], current["spill_st"], current["spill_ld"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m.group(1))
        m = re.search(r"(\d+) bytes smem", line)
        if m:
            current["smem"] = int(m.group(1))
    return kernels


def short_name(demangled: str) -> str:
    name = demangled.replace("(anonymous namespace)::", "").replace("internlm2::cuda::", "")
    name = re.sub(r"^void ", "", re.sub(r"\(.*\)$", "", name))  # drop the return type and parameter list
    return name.replace("c10::BFloat16", "bf16").replace("c10::Half", "fp16")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--filter", default="", help="only .cu files whose path contains this")
    ap.add_argument("--arch", default="", help="only this architecture (e.g. sm_90a)")
    ap.add_argument("--out", help="write a Markdown table here")
    ap.add_argument("--strict", action="store_true", help="exit 1 if any kernel spills")
    args = ap.parse_args()

    bdir = build_dir()
    rows = []
    for cmd in nvcc_commands(bdir):
        src = re.search(r" -c (\S+\.cu)", cmd).group(1)
        if args.filter not in src:
            continue
        argv = shlex.split(cmd)
        if argv[0].endswith("ccache"):
            argv = argv[1:]
        i = argv.index("-o")
        argv[i + 1] = "/dev/null"
        res = subprocess.run(argv + ["-Xptxas=-v"], cwd=bdir, capture_output=True, text=True)
        if res.returncode != 0:
            print(res.stderr, file=sys.stderr)
            return res.returncode
        for k in parse(res.stderr):
            k["source"] = Path(src).name
            rows.append(k)
    for k, name in zip(rows, demangle([k["kernel"] for k in rows])):
        k["name"] = short_name(name)
    rows = [k for k in rows if not args.arch or k["arch"] == args.arch]
    rows.sort(key=lambda k: (-(k["spill_st"] + k["spill_ld"]), k["source"], k["name"], k["arch"]))

    header = "| source | kernel | arch | registers | smem (B) | stack (B) | spill st/ld (B) |"
    lines = [header, "|---|---|---|---|---|---|---|"]
    for k in rows:
        lines.append(
            f"| {k['source']} | `{k['name']}` | {k['arch']} | {k['registers']} | {k['smem']} | {k['stack']} | "
            f"{k['spill_st']}/{k['spill_ld']} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    spilling = [k for k in rows if k["spill_st"] or k["spill_ld"]]
    print(f"\n{len(rows)} kernels, {len(spilling)} spill to local memory", file=sys.stderr)
    return 1 if args.strict and spilling else 0


if __name__ == "__main__":
    sys.exit(main())
