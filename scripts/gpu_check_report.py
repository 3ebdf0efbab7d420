#!/usr/bin/env python3
"""The GPU check's record and results file (scripts/gpu_check.sh calls it; no torch import, so it is quick).

    gpu_check_report.py record --out OUT --work WORK --step NAME --status ok|failed|timeout|skipped \
        --seconds S [--detail TEXT]      append one step to OUT/steps.jsonl and re-render OUT/summary.md
    gpu_check_report.py render --out OUT --work WORK [--copy-to FILE]

The summary is re-rendered after every step, so a run stopped at any point still says what passed. It reads:
OUT/steps.jsonl (the steps so far), WORK/machine.json (card, driver, versions), WORK/tests/<file>.log
(pytest -v output of each test file; <file>.blocking.log for the second pass under CUDA_LAUNCH_BLOCKING=1)
and WORK/bench/*.md (each benchmark's table, as benchmarks/harness.py writes it).
"""

import argparse
import json
import re
import shutil
import time
from pathlib import Path

STATUSES = ("ok", "failed", "timeout", "skipped")
_RESULT = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
_SHORT_SUMMARY = re.compile(r"^(FAILED|ERROR) (\S+)(?: - (.*))?$")
_TOTALS = re.compile(r"^=+ (.*\d+ (?:passed|failed|skipped|error|errors|deselected)\b.*) in [\d.]+s")


def parse_pytest_log(text: str) -> dict:
    """Per-test outcomes from `pytest -v` output (complete even when the run was killed), the first line of
    each failure's message and pytest's closing totals line (None when it never got there)."""
    outcomes, messages, totals = {}, {}, None
    for line in text.splitlines():
        if m := _RESULT.match(line):
            outcomes.setdefault(m.group(1), m.group(2))
        elif m := _SHORT_SUMMARY.match(line):
            outcomes[m.group(2)] = m.group(1)
            messages[m.group(2)] = (m.group(3) or "").strip()[:200]
        elif m := _TOTALS.match(line):
            totals = m.group(1)
    return {"outcomes": outcomes, "messages": messages, "totals": totals}


def read_steps(out: Path) -> list[dict]:
    path = out / "steps.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def read_machine(work: Path) -> dict:
    path = work / "machine.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _test_sections(work: Path) -> list[str]:
    logs = sorted((work / "tests").glob("*.log")) if (work / "tests").is_dir() else []
    first = [p for p in logs if not p.name.endswith(".blocking.log")]
    if not first:
        return ["No test file has run yet."]
    rows = ["| file | passed | failed | errors | skipped | pytest's totals | second pass (CUDA_LAUNCH_BLOCKING=1) |",
            "|---|---|---|---|---|---|---|"]
    failures, every = [], []
    for log in first:
        result = parse_pytest_log(log.read_text(errors="replace"))
        counts = {k: sum(1 for o in result["outcomes"].values() if o == k) for k in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
        blocking = log.with_name(log.name.removesuffix(".log") + ".blocking.log")
        second = "-"
        if blocking.exists():
            again = parse_pytest_log(blocking.read_text(errors="replace"))
            still = sorted(t for t, o in again["outcomes"].items() if o in ("FAILED", "ERROR"))
            second = again["totals"] or f"stopped after {len(again['outcomes'])} tests"
            failures += [f"- second pass: `{t}`: {_cell(again['messages'].get(t, ''))}" for t in still]
        rows.append(f"| {log.stem} | {counts['PASSED']} | {counts['FAILED']} | {counts['ERROR']} | {counts['SKIPPED']} | "
                    f"{_cell(result['totals'] or 'stopped before its end (see tests.log)')} | {_cell(second)} |")
        failures += [f"- `{t}`: {_cell(result['messages'].get(t, ''))}" for t, o in sorted(result["outcomes"].items())
                     if o in ("FAILED", "ERROR")]
        every += [f"| `{t}` | {o} |" for t, o in sorted(result["outcomes"].items())]
    return [*rows, "", "### Failures", *(failures or ["none"]), "", "<details><summary>Every test outcome</summary>",
            "", "| test | outcome |", "|---|---|", *every, "", "</details>"]


def _benchmark_sections(work: Path) -> list[str]:
    tables = sorted((work / "bench").glob("*.md")) if (work / "bench").is_dir() else []
    if not tables:
        return ["No benchmark has written results yet."]
    lines = []
    for table in tables:
        text = table.read_text().strip().splitlines()
        # harness.Report's Markdown starts with "# Name": one level down here
        lines += [("#" + text[0]) if text and text[0].startswith("# ") else f"### {table.stem}", *text[1:], ""]
    return lines


def render(out: Path, work: Path) -> str:
    steps, machine = read_steps(out), read_machine(work)
    bad = [s for s in steps if s["status"] in ("failed", "timeout")]
    mode = next((s["detail"] for s in steps if s["step"] == "mode"), "")
    verdict = "no step yet" if not steps else (
        f"{len(bad)} of {len(steps)} steps failed or ran out of time" if bad else f"all {len(steps)} steps ok or skipped")
    lines = [
        f"# GPU check {time.strftime('%Y-%m-%d')} on {machine.get('card', 'an unrecorded machine')}",
        "",
        f"Written by `scripts/gpu_check.sh` ({_cell(mode) or 'mode not recorded'}). Verdict: {verdict}.",
        "",
        "## Machine",
        *([f"- {key}: {_cell(value)}" for key, value in machine.items() if key != "tag"] or ["- not recorded yet"]),
        "",
        "## Steps, in the order they ran",
        "| step | status | seconds | detail |",
        "|---|---|---|---|",
        *[f"| {_cell(s['step'])} | {s['status']} | {s['seconds']} | {_cell(s['detail'])} |" for s in steps],
        "",
        "## Tests (each file in its own process)",
        *_test_sections(work),
        "",
        "## Benchmarks",
        *_benchmark_sections(work),
    ]
    return "\n".join(lines) + "\n"


def write_summary(out: Path, work: Path) -> Path:
    path = out / "summary.md"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(render(out, work))
    tmp.replace(path)  # a reader never sees half a file
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["record", "render"])
    ap.add_argument("--out", type=Path, required=True, help="the folder that comes back (at most 8 files)")
    ap.add_argument("--work", type=Path, required=True, help="the check's scratch folder")
    ap.add_argument("--step")
    ap.add_argument("--status", choices=STATUSES)
    ap.add_argument("--seconds", type=int, default=0)
    ap.add_argument("--detail", default="")
    ap.add_argument("--copy-to", type=Path, help="also write the summary here (the results file)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.command == "record":
        if not args.step or not args.status:
            ap.error("record needs --step and --status")
        entry = {"step": args.step, "status": args.status, "seconds": args.seconds, "detail": args.detail}
        with open(args.out / "steps.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")
        print(f"== {args.step}: {args.status} ({args.seconds}s) {args.detail}", flush=True)
    summary = write_summary(args.out, args.work)
    if args.copy_to:
        args.copy_to.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(summary, args.copy_to)


if __name__ == "__main__":
    main()
