#!/usr/bin/env bash
# The GPU check in one call of the device tool (an H100/H200 lent for a few minutes): build, every CUDA test
# file in its own process, compute-sanitizer's memcheck on one attention case, an end-to-end training run
# that takes the fused kernels, then the kernel benchmarks in the time that is left, all inside a hard
# deadline (GPU_CHECK_DEADLINE_S, 420 s, build included). It records as it goes, so a run stopped at any
# point still says what passed. What comes back ($OUT, at most 8 files):
#   summary.md      the results file, re-rendered after every step (also benchmarks/results/<date>-<card>.md)
#   steps.jsonl     one line per step: status, seconds, detail
#   build.log  tests.log  memcheck.log  e2e.log  benchmarks.log
#   benchmarks.tgz  every benchmark's .md/.json (unpack into benchmarks/results/)
#
# The device machine has no network: the CUTLASS headers come from the nvidia-cutlass wheel. Once, here:
#     pip download --no-deps nvidia-cutlass==4.2.0.0 -d wheels
# then call the device tool with command "bash scripts/gpu_check.sh", carry ["wheels"], timeout_s 480.
#
#     bash scripts/gpu_check.sh --cpu     the dry run on a machine without a GPU: the same plumbing (CUTLASS
#                                         from the wheel, build, per-file runner and its second pass, summary,
#                                         deadline, the sanitizer's case on the CPU, a short CPU training run,
#                                         CPU benchmarks sharing what is left, the 8-file limit)
#                                         and the build: what is built already, rebuilt incrementally
# Knobs: GPU_CHECK_DEADLINE_S, GPU_CHECK_TEST_TIMEOUT_S (90 s per test), GPU_CHECK_TESTS (test files or node
# ids, space-separated), GPU_CHECK_SKIP (steps to leave out: build tests memcheck e2e benchmarks),
# GPU_CHECK_WORK (scratch: /tmp/gpu_check), GPU_CHECK_WHEELS (wheels), GPU_CHECK_CUTLASS_DIR (build/cutlass),
# GPU_CHECK_RESULTS (benchmarks/results; none for --cpu), MAX_JOBS (all cores), INTERNLM2_CUDA_ARCHS (90a: H100/H200).
# Exit status: 0 when every step was ok or skipped, 1 when one failed or ran out of time, 2 when the check
# could not start.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)

MODE=gpu
[ "${1:-}" = "--cpu" ] && MODE=cpu
PY=${PYTHON:-python3}
DEADLINE=${GPU_CHECK_DEADLINE_S:-420}
PER_TEST=${GPU_CHECK_TEST_TIMEOUT_S:-90}
WORK=${GPU_CHECK_WORK:-/tmp/gpu_check}
WHEELS=${GPU_CHECK_WHEELS:-wheels}
# The results file goes here; a dry run writes none unless asked (its summary is in $OUT).
RESULTS=${GPU_CHECK_RESULTS:-$([ "$MODE" = gpu ] && echo benchmarks/results)}
OUT=${OUT:-$ROOT/benchmarks/results/gpu_check-logs}
# Phases end by these many seconds from the start (tests may take what the build left them); the last
# RESERVE seconds pack and write what comes back.
BUILD_BY=$(( DEADLINE * 45 / 100 ))
TESTS_BY=$(( DEADLINE * 70 / 100 ))
RESERVE=15

export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export COLUMNS=250  # pytest's short summary keeps each failure's message on its line
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
if [ "$MODE" = cpu ] && [ -f internlm2/_build_meta.json ]; then
  # The dry run rebuilds what is built (a no-op when it is up to date), never a different set of kernels.
  eval "$("$PY" -c "import json; m = json.load(open('internlm2/_build_meta.json'))
print(f\"export INTERNLM2_CUDA_ARCHS='{m['cuda_archs']}'\" if m['cuda_kernels'] else 'export INTERNLM2_SKIP_CUDA=1')")"
fi
export INTERNLM2_CUDA_ARCHS=${INTERNLM2_CUDA_ARCHS:-90a}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
# A compiler warning must not cost the GPU window: it is counted in the build step instead (CI builds with
# warnings as errors).
export INTERNLM2_WERROR=${INTERNLM2_WERROR:-0}
export INTERNLM2_BENCH_RESULTS_DIR=$WORK/bench
[ "$MODE" = gpu ] && export INTERNLM2_EXPECT_CUDA_KERNELS=1  # a build that dropped them fails the tests

rm -rf "${WORK:?}" "${OUT:?}"/*
mkdir -p "$WORK/tests" "$WORK/bench" "$OUT"
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
left_until() { echo $(( $1 - $(elapsed) )); }  # seconds from now until `$1` seconds after the start
record() {  # step status seconds detail
  "$PY" scripts/gpu_check_report.py record --out "$OUT" --work "$WORK" --step "$1" --status "$2" --seconds "$3" \
    --detail "$4"
}
status_of() { case $1 in 0) echo ok ;; 124 | 137) echo timeout ;; *) echo failed ;; esac; }
wanted() {  # step name: false (and recorded as skipped) when GPU_CHECK_SKIP names it
  case " ${GPU_CHECK_SKIP:-} " in
    *" $1 "*) record "$1" skipped 0 "GPU_CHECK_SKIP"; return 1 ;;
  esac
}

finish() {
  local code=$?
  tar czf "$OUT/benchmarks.tgz" -C "$WORK/bench" . 2>/dev/null
  local files tag
  files=$(find "$OUT" -type f | wc -l)
  tag=$("$PY" -c "import json; print(json.load(open('$WORK/machine.json'))['tag'])" 2>/dev/null)
  record "what comes back" "$([ "$files" -le 8 ] && echo ok || echo failed)" 0 \
    "after $(elapsed)s in all: $files files in \$OUT (the device tool returns at most 8): $(cd "$OUT" && ls | tr '\n' ' ')"
  # The results file, once the machine is known (not for a run that stopped before it).
  "$PY" scripts/gpu_check_report.py render --out "$OUT" --work "$WORK" \
    ${tag:+${RESULTS:+--copy-to "$RESULTS/$(date +%F)-$tag.md"}} > /dev/null
  echo
  echo "================ gpu_check ($MODE) finished in $(elapsed)s of ${DEADLINE}s ================"
  sed -n '/^## Steps/,/^## Tests/p' "$OUT/summary.md" | sed '$d'
  grep -E '^- .*`tests/' "$OUT/summary.md" | head -20
  if grep -qE '"status": "(failed|timeout)"' "$OUT/steps.jsonl"; then
    [ "$code" = 2 ] || code=1
  fi
  exit "$code"
}
trap finish EXIT

record mode ok 0 "$MODE mode, deadline ${DEADLINE}s, ${PER_TEST}s per test, $MAX_JOBS build jobs, archs $INTERNLM2_CUDA_ARCHS"

# ---- CUTLASS/CuTe headers from the carried wheel (no pip, no network): unzip its include tree.
t=$(elapsed)
whl=$(ls "$WHEELS"/nvidia_cutlass-*.whl 2>/dev/null | head -1)
if [ -z "$whl" ]; then
  record cutlass failed 0 "no $WHEELS/nvidia_cutlass-*.whl: run 'pip download --no-deps nvidia-cutlass==4.2.0.0 -d wheels' on the dev machine and carry wheels/"
  exit 2
fi
# At a path named by the wheel, the same on every run, so that a rebuild recompiles nothing.
headers=${GPU_CHECK_CUTLASS_DIR:-$ROOT/build/cutlass}/$(basename "$whl" .whl)
"$PY" - "$whl" "$headers" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith("cutlass_library/source/include/")])
EOF
export CUTLASS_PATH=$headers/cutlass_library/source
if [ -f "$CUTLASS_PATH/include/cute/tensor.hpp" ]; then
  record cutlass ok $(( $(elapsed) - t )) "headers from $(basename "$whl")"
else
  record cutlass failed $(( $(elapsed) - t )) "$whl holds no cutlass_library/source/include/cute/tensor.hpp"
  exit 2
fi

# ---- the machine, before anything can fail on it
t=$(elapsed)
"$PY" - "$WORK/machine.json" "$MODE" <<'EOF'
import json, platform, shutil, subprocess, sys
import torch

def run(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""

info = {}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info["card"] = f"{p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, sm_{p.major}{p.minor}"
    info["driver"] = run("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader") or "unknown"
    name = p.name.upper()
    info["tag"] = next((c.lower() for c in ("H200", "H100", "A100") if c in name), "gpu")
else:
    info["card"] = "none (no CUDA device visible)"
    info["tag"] = "cpu-dry-run" if sys.argv[2] == "cpu" else "no-gpu"
info["torch"] = f"{torch.__version__} (CUDA {torch.version.cuda})"
info["nvcc"] = (run("nvcc", "--version").splitlines() or ["not found"])[-1]
info["python"] = platform.python_version()
info["host"] = f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores"
info["pytest-timeout"] = "yes" if __import__("importlib.util").util.find_spec("pytest_timeout") else "no (per-file timeouts only)"
info["compute-sanitizer"] = shutil.which("compute-sanitizer") or "not found"
json.dump(info, open(sys.argv[1], "w"), indent=1)
EOF
record machine "$([ -s "$WORK/machine.json" ] && echo ok || echo failed)" $(( $(elapsed) - t )) \
  "$("$PY" -c "import json; m = json.load(open('$WORK/machine.json')); print(m['card'], '|', m['torch'])" 2>&1 | tail -1)"

# ---- build: every core, the card's architecture only
step_build() {
  local t rc warnings spills built
  t=$(elapsed)
  timeout -k 10 "$(left_until $BUILD_BY)" "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1
  rc=$?
  warnings=$(grep -cE "warning[: #]" "$OUT/build.log")
  spills=$(grep -cE "bytes spill (stores|loads)|Registers are spilled" "$OUT/build.log")
  built=$("$PY" -c "import json; m = json.load(open('internlm2/_build_meta.json'))
print('CUDA kernels for', m['cuda_archs'] if m['cuda_kernels'] else 'no CUDA kernels')" 2>/dev/null)
  record build "$(status_of $rc)" $(( $(elapsed) - t )) \
    "exit $rc; ${built:-no build metadata}; $warnings warning lines, $spills spill lines in build.log"
  if [ $rc != 0 ]; then
    tail -30 "$OUT/build.log"
    exit 1
  fi
}

# ---- tests: one process per file, each test bounded, a second pass only for the files that failed
log_name() { local n=${1#/}; n=${n#tests/}; n=${n//\//_}; n=${n//::/__}; echo "${n%.py}"; }

run_pytest() {  # step-name target log-file budget extra-args...
  local step=$1 target=$2 log=$3 budget=$4 t rc totals
  shift 4
  t=$(elapsed)
  if [ "$budget" -lt 10 ]; then
    record "$step" skipped 0 "no time left in the test window"
    return 0
  fi
  { echo; echo "######## $step"; } >> "$OUT/tests.log"
  timeout -k 5 "$budget" "$PY" -u -m pytest "$target" "${pytest_args[@]}" "$@" 2>&1 | tee "$log" >> "$OUT/tests.log"
  rc=$?
  totals=$(grep -E "^=+ .* in [0-9.]+s" "$log" | tail -1 | tr -d '=' | xargs)
  record "$step" "$(status_of $rc)" $(( $(elapsed) - t )) "exit $rc: ${totals:-stopped before the closing summary}"
  return $rc
}

step_tests() {
  pytest_args=(-v -rfEs --durations=5 -o "cache_dir=$WORK/pytest_cache")
  if "$PY" -c "import pytest_timeout" 2>/dev/null; then
    pytest_args+=("--timeout=$PER_TEST")
  else  # a hung test dumps its stack; the file's own timeout stops it
    pytest_args+=(-o "faulthandler_timeout=$PER_TEST")
  fi
  # The small files first (a verdict on several kernels early), attention last; GPU tests elsewhere by id.
  local defaults=() targets=() failed=() f target
  for f in tests/cuda/test_*.py; do
    [ "$f" != tests/cuda/test_flash_attention_cuda.py ] && defaults+=("$f")
  done
  defaults+=(tests/cuda/test_flash_attention_cuda.py tests/test_metrics.py::test_this_gpus_peak_and_memory)
  read -r -a targets <<< "${GPU_CHECK_TESTS:-${defaults[*]}}"
  local rc
  for target in "${targets[@]}"; do
    run_pytest "tests $target" "$target" "$WORK/tests/$(log_name "$target").log" "$(left_until $TESTS_BY)"
    rc=$?
    [ $rc != 0 ] && [ $rc != 124 ] && [ $rc != 137 ] && failed+=("$target")  # not for a file the window closed on
  done
  # The failed tests again with synchronous launches, so an error names the launch that caused it (after an
  # illegal access every later test of the process fails too: the first few failures are the ones to read).
  for target in "${failed[@]}"; do
    CUDA_LAUNCH_BLOCKING=1 run_pytest "again, CUDA_LAUNCH_BLOCKING=1, last failed: $target" "$target" \
      "$WORK/tests/$(log_name "$target").blocking.log" $(( $(left_until $TESTS_BY) + 30 )) --lf --maxfail=5
  done
  return 0
}

# ---- memory errors found, not guessed: one attention case under compute-sanitizer's memcheck
step_memcheck() {
  local t rc budget
  t=$(elapsed)
  budget=$(( $(left_until $DEADLINE) - RESERVE ))
  [ "$budget" -gt 40 ] && budget=40
  if [ "$MODE" = cpu ]; then
    timeout -k 5 "$budget" "$PY" scripts/gpu_memcheck_case.py --device cpu > "$OUT/memcheck.log" 2>&1
    rc=$?
    record memcheck "$([ $rc = 0 ] && echo skipped || echo failed)" $(( $(elapsed) - t )) \
      "dry run: no GPU, so no sanitizer; the case itself ran on the CPU kernels (exit $rc)"
  elif ! command -v compute-sanitizer > /dev/null; then
    record memcheck skipped 0 "compute-sanitizer not found"
  elif [ "$budget" -lt 15 ]; then
    record memcheck skipped 0 "no time left"
  else
    # One allocation per tensor (no caching allocator), so an access past a tensor's end is caught.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -k 5 "$budget" compute-sanitizer --tool memcheck --error-exitcode 3 \
      --print-limit 20 "$PY" scripts/gpu_memcheck_case.py > "$OUT/memcheck.log" 2>&1
    rc=$?
    record memcheck "$(status_of $rc)" $(( $(elapsed) - t )) \
      "exit $rc: $(grep -E "ERROR SUMMARY|not supported|Error" "$OUT/memcheck.log" | head -2 | tr '\n' ' ')"
  fi
}

# ---- end to end: configs/gpu_check.yaml trains with every op on its fused kernel; say which path ran
step_e2e() {
  local t rc budget fallbacks losses args
  t=$(elapsed)
  budget=$(( $(left_until $DEADLINE) - RESERVE - 60 ))  # leave the benchmarks a minute at least
  local cap=120
  args=(--config configs/gpu_check.yaml --set "run_dir=$WORK/e2e")
  if [ "$MODE" = cpu ]; then  # a few small float32 steps: the same trainer code on the CPU kernels
    cap=300
    args+=(--set dtype=float32 --set optim.warmup_steps=1 --set eval.every=2 --set eval.rows=2
           --set checkpoint.every=2 --set data.builtin.max_bytes=300000 --set sample.max_new_tokens=4)
    for stage in 0 1; do
      args+=(--set "stages.$stage.steps=$(( 3 - 2 * stage ))" --set "stages.$stage.seq_len=$(( 128 << stage ))"
             --set "stages.$stage.global_batch_size=2" --set "stages.$stage.micro_batch_size=1")
    done
  fi
  [ "$budget" -gt $cap ] && budget=$cap
  if [ "$budget" -lt 20 ]; then
    record e2e skipped 0 "no time left"
    return
  fi
  timeout -k 5 "$budget" "$PY" -u -m internlm2.cli pretrain "${args[@]}" > "$OUT/e2e.log" 2>&1
  rc=$?
  fallbacks=$(grep -F "plain-PyTorch reference instead" "$OUT/e2e.log" | grep -oE "internlm2\.ops\.[a-z_]+: [^;]+" |
    sort -u | tr '\n' ' ')
  losses=$("$PY" - "$WORK/e2e/metrics.jsonl" 2>/dev/null <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
train = [r for r in rows if "loss" in r and "tokens_per_s" in r]
print(f"loss {train[0]['loss']:.3f} -> {train[-1]['loss']:.3f} over {len(train)} logged steps, "
      f"{train[-1]['tokens_per_s']:.0f} tokens/s at the end")
EOF
)
  [ -z "$fallbacks" ] && [ $rc = 0 ] && fallbacks="every op took its kernel (no KernelFallbackWarning)"
  record e2e "$(status_of $rc)" $(( $(elapsed) - t )) \
    "configs/gpu_check.yaml, exit $rc; ${losses:-no metrics}; paths: ${fallbacks:-not known (see e2e.log)}"
}

# ---- benchmarks: each gets an equal share of what is left (a share one leaves unused goes to the next);
# one stopped at its share writes the rows it has measured (benchmarks/harness.py)
step_benchmarks() {
  local benchmarks i t rc share argv
  if [ "$MODE" = gpu ]; then
    benchmarks=("benchmarks.bench_flash_attention_cuda --quick" "benchmarks.bench_rms_norm --device cuda"
                "benchmarks.bench_swiglu_cuda" "benchmarks.bench_rope_cuda" "benchmarks.bench_linear_cross_entropy_cuda"
                "benchmarks.bench_kv_cache_attention --device cuda --dtypes bfloat16 --repeats 3")
  else
    benchmarks=("benchmarks.bench_rms_norm --device cpu --repeats 3" "benchmarks.bench_swiglu_cpu --repeats 3"
                "benchmarks.bench_rope_cpu --repeats 3")
  fi
  for i in "${!benchmarks[@]}"; do
    t=$(elapsed)
    share=$(( ($(left_until $DEADLINE) - RESERVE) / (${#benchmarks[@]} - i) ))
    if [ "$share" -lt 15 ]; then
      record "benchmark ${benchmarks[$i]}" skipped 0 "no time left"
      continue
    fi
    { echo; echo "######## ${benchmarks[$i]} (${share}s)"; } >> "$OUT/benchmarks.log"
    read -r -a argv <<< "${benchmarks[$i]}"
    timeout -s TERM -k 10 "$share" "$PY" -u -m "${argv[@]}" >> "$OUT/benchmarks.log" 2>&1
    rc=$?
    record "benchmark ${benchmarks[$i]}" "$(status_of $rc)" $(( $(elapsed) - t )) \
      "exit $rc (share ${share}s)$([ $rc = 124 ] && echo ': stopped at its share; the rows measured are kept')"
  done
}

for step in build tests memcheck e2e benchmarks; do
  if wanted "$step"; then "step_$step"; fi
done
