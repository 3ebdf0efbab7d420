"""scripts/gpu_check.sh and its writer (scripts/gpu_check_report.py) on a machine without a GPU: the record it
keeps, what it makes of pytest's output, and the script's dry run (--cpu) of its plumbing."""

import importlib.util
import json
import os
import subprocess
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("gpu_check_report", ROOT / "scripts" / "gpu_check_report.py")
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)

KILLED_LOG = """\
tests/cuda/test_a.py::test_one[d64] PASSED                                  [ 25%]
tests/cuda/test_a.py::test_one[d128] FAILED                                 [ 50%]
tests/cuda/test_a.py::test_two SKIPPED (needs a CUDA device)                [ 75%]
"""
FINISHED_LOG = KILLED_LOG + """\
tests/cuda/test_a.py::test_three ERROR                                      [100%]
=========================== short test summary info ============================
FAILED tests/cuda/test_a.py::test_one[d128] - AssertionError: out: kernel error 1.2e-01 exceeds 2.0 x reference
ERROR tests/cuda/test_a.py::test_three - RuntimeError: CUDA error: an illegal memory access was encountered
============= 1 failed, 1 passed, 1 skipped, 1 error in 3.21s ==============
"""


def test_pytest_log_is_read_per_test_also_when_the_run_was_killed():
    killed = report.parse_pytest_log(KILLED_LOG)
    assert killed["outcomes"] == {"tests/cuda/test_a.py::test_one[d64]": "PASSED",
                                  "tests/cuda/test_a.py::test_one[d128]": "FAILED",
                                  "tests/cuda/test_a.py::test_two": "SKIPPED"}
    assert killed["totals"] is None
    done = report.parse_pytest_log(FINISHED_LOG)
    assert done["outcomes"]["tests/cuda/test_a.py::test_three"] == "ERROR"
    assert done["messages"]["tests/cuda/test_a.py::test_one[d128]"].startswith("AssertionError: out: kernel error")
    assert done["totals"] == "1 failed, 1 passed, 1 skipped, 1 error"


def test_summary_names_every_step_test_and_benchmark(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    (work / "tests").mkdir(parents=True)
    (work / "bench").mkdir()
    out.mkdir()
    (work / "machine.json").write_text(json.dumps({"card": "NVIDIA H200, 140 GiB", "driver": "580.1", "tag": "h200"}))
    (work / "tests" / "cuda_test_a.log").write_text(FINISHED_LOG)
    (work / "tests" / "cuda_test_a.blocking.log").write_text(
        "tests/cuda/test_a.py::test_one[d128] FAILED\nFAILED tests/cuda/test_a.py::test_one[d128] - at launch 7\n")
    (work / "bench" / "rms_norm-h200.md").write_text("# RMSNorm kernel benchmark\n\n| shape | ms |\n|---|---|\n| 4x4 | 0.1 |\n")
    for step, status in (("build", "ok"), ("tests tests/cuda/test_a.py", "failed")):
        (out / "steps.jsonl").open("a").write(json.dumps({"step": step, "status": status, "seconds": 3, "detail": "d"}) + "\n")
    text = report.render(out, work)
    assert "on NVIDIA H200, 140 GiB" in text.splitlines()[0]
    assert "1 of 2 steps failed or ran out of time" in text
    assert "| cuda_test_a | 1 | 1 | 1 | 1 | 1 failed, 1 passed, 1 skipped, 1 error | stopped after 1 tests |" in text
    assert "- second pass: `tests/cuda/test_a.py::test_one[d128]`: at launch 7" in text
    assert "- `tests/cuda/test_a.py::test_three`: RuntimeError: CUDA error: an illegal memory access" in text
    assert "| `tests/cuda/test_a.py::test_two` | SKIPPED |" in text
    assert "## RMSNorm kernel benchmark" in text and "| 4x4 | 0.1 |" in text


def test_dry_run_records_each_step_and_reruns_only_the_failing_file(tmp_path):
    """The script's own plumbing on this machine: the CUTLASS step from a wheel, the per-file runner (the
    second pass, under CUDA_LAUNCH_BLOCKING=1, runs the failed test alone), the memcheck case on the CPU,
    the summary and what comes back."""
    wheels, out, work, results = (tmp_path / d for d in ("wheels", "out", "work", "results"))
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "nvidia_cutlass-4.2.0.0-py3-none-any.whl", "w") as z:
        z.writestr("cutlass_library/source/include/cute/tensor.hpp", "// stand-in\n")
    tests = tmp_path / "suite"
    tests.mkdir()
    (tests / "test_passes.py").write_text("def test_ok():\n    assert True\n")
    (tests / "test_fails_unless_blocking.py").write_text(
        "import os\n\ndef test_ok():\n    pass\n\n"
        "def test_needs_blocking():\n    assert os.environ.get('CUDA_LAUNCH_BLOCKING') == '1', 'first pass'\n")
    env = dict(os.environ, OUT=str(out), GPU_CHECK_WORK=str(work), GPU_CHECK_WHEELS=str(wheels),
               GPU_CHECK_CUTLASS_DIR=str(tmp_path / "cutlass"), GPU_CHECK_RESULTS=str(results),
               GPU_CHECK_SKIP="build e2e benchmarks", GPU_CHECK_DEADLINE_S="300",
               GPU_CHECK_TESTS=f"{tests / 'test_passes.py'} {tests / 'test_fails_unless_blocking.py'}")
    run = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--cpu"], env=env, capture_output=True,
                         text=True, timeout=240)
    assert run.returncode == 1, run.stdout + run.stderr  # one step failed: the first pass of the failing file
    steps = {s["step"]: s for s in report.read_steps(out)}
    statuses = {name: s["status"] for name, s in steps.items()}
    assert statuses["cutlass"] == "ok" and statuses["machine"] == "ok"
    assert (tmp_path / "cutlass" / "nvidia_cutlass-4.2.0.0-py3-none-any" / "cutlass_library" / "source" / "include" /
            "cute" / "tensor.hpp").read_text() == "// stand-in\n"
    assert statuses["build"] == statuses["e2e"] == statuses["benchmarks"] == "skipped"
    assert statuses[f"tests {tests / 'test_passes.py'}"] == "ok"
    assert statuses[f"tests {tests / 'test_fails_unless_blocking.py'}"] == "failed"
    again = steps[f"again, CUDA_LAUNCH_BLOCKING=1, last failed: {tests / 'test_fails_unless_blocking.py'}"]
    assert again["status"] == "ok" and "1 passed, 1 deselected" in again["detail"]  # --lf: the failed test alone
    assert not any(n.startswith("again") and "test_passes" in n for n in steps)
    assert statuses["memcheck"] == "skipped" and "ran on the CPU kernels (exit 0)" in steps["memcheck"]["detail"]
    assert statuses["what comes back"] == "ok"
    back = sorted(p.name for p in out.iterdir())
    assert len(back) <= 8 and all(p.is_file() for p in out.iterdir()), back
    summary = (out / "summary.md").read_text()
    assert "AssertionError: first pass" in summary
    assert (results / f"{__import__('time').strftime('%Y-%m-%d')}-cpu-dry-run.md").read_text() == summary


def test_without_the_cutlass_wheel_it_stops_at_once_saying_how_to_fetch_it(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"), GPU_CHECK_WORK=str(tmp_path / "work"),
               GPU_CHECK_WHEELS=str(tmp_path / "no-wheels"), GPU_CHECK_RESULTS=str(tmp_path / "results"))
    run = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 2
    assert "pip download --no-deps nvidia-cutlass==4.2.0.0 -d wheels" in run.stdout
    assert [s["step"] for s in report.read_steps(tmp_path / "out")] == ["mode", "cutlass", "what comes back"]
    assert not (tmp_path / "results").exists()  # no results file for a run that never reached the machine
