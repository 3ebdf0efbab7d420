#!/usr/bin/env bash
# GPU verification in one call on an H100/H200 machine: build the extension with every core, run the CUDA
# tests, run the kernel benchmarks, print a short table last. Logs and results go to $OUT (when the device
# tool sets it) and to benchmarks/results/gpu-<date>-<card>.md.
#
# The device machine has torch, pytest, cmake and ninja but no internet: the CUTLASS headers come from a
# wheel carried along. On the dev machine, once:
#     pip download --no-deps nvidia-cutlass==4.2.0.0 -d wheels
# then run through the device tool with carry=["wheels"]:
#     bash scripts/gpu_check.sh
# Dry run here (no GPU: builds, then lists what it would run):  GPU_CHECK_DRY_RUN=1 bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
# Only the card at hand: an sm_90a build is what runs on H100/H200 (CI compiles 80 as well).
export INTERNLM2_CUDA_ARCHS=${INTERNLM2_CUDA_ARCHS:-90a}
DRY=${GPU_CHECK_DRY_RUN:-0}
# Seconds after which no further benchmark starts, so one call fits the device lease with time to spare.
BUDGET=${GPU_CHECK_BUDGET_S:-420}
STAMP=$(date +%F)
LOGS=${OUT:-benchmarks/results/gpu_check-logs}
mkdir -p "$LOGS" benchmarks/results

# Kernel benchmarks, each writing benchmarks/results/<name>-<card>.{md,json}. Every CUDA kernel adds its line.
BENCHMARKS=(
  "benchmarks.bench_rms_norm --device cuda"
  "benchmarks.bench_flash_attention_cuda"
  "benchmarks.bench_swiglu_cuda"
  "benchmarks.bench_rope_cuda"
  "benchmarks.bench_linear_cross_entropy_cuda"
)

SUMMARY=()
note() { SUMMARY+=("$1"); echo "== $1"; }
elapsed() { echo $(( $(date +%s) - $1 ))s; }

t0=$(date +%s)
if ls wheels/nvidia_cutlass-*.whl >/dev/null 2>&1; then
  $PY -m pip install --no-deps --no-index --quiet wheels/nvidia_cutlass-*.whl || note "cutlass wheel install FAILED"
elif [ -z "${CUTLASS_PATH:-}" ] && ! $PY -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('cutlass_library') is None)"; then
  note "no CUTLASS headers: carry wheels/ (see the header of this script) or set CUTLASS_PATH"
  exit 1
fi

$PY setup.py build_ext --inplace > "$LOGS/build.log" 2>&1
build_rc=$?
note "build (archs $INTERNLM2_CUDA_ARCHS, $MAX_JOBS jobs): $([ $build_rc = 0 ] && echo ok || echo FAILED) in $(elapsed $t0)"
if [ $build_rc != 0 ]; then
  tail -40 "$LOGS/build.log"
  exit 1
fi
grep -E "spill|C7517" "$LOGS/build.log" | sort -u | head -20 > "$LOGS/ptxas_warnings.txt"
[ -s "$LOGS/ptxas_warnings.txt" ] && note "ptxas warnings: $(wc -l < "$LOGS/ptxas_warnings.txt") (see ptxas_warnings.txt)"

$PY -m internlm2.env > "$LOGS/env.txt" 2>&1
card=$($PY - <<'EOF'
import torch
print(torch.cuda.get_device_name(0).replace(" ", "-") if torch.cuda.is_available() else "no-gpu")
EOF
)
driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)
note "card: $card, driver ${driver:-unknown}, torch $($PY -c 'import torch; print(torch.__version__)')"

if [ "$DRY" = 1 ]; then
  note "dry run: would run the CUDA tests (pytest tests -k cuda), the tiny run in bf16, and: ${BENCHMARKS[*]}"
  printf '%s\n' "${SUMMARY[@]}"
  exit 0
fi

t1=$(date +%s)
timeout 300 $PY -m pytest tests -k cuda -q -rfEs -p no:cacheprovider > "$LOGS/cuda_tests.log" 2>&1
test_rc=$?
note "CUDA tests: $(tail -1 "$LOGS/cuda_tests.log") (exit $test_rc, $(elapsed $t1))"

# End to end on the GPU: the tiny default for a few steps in bf16 (every op through its CUDA kernel, the
# trainer, checkpointing, export). The last logged line carries loss and tokens/s.
t3=$(date +%s)
rm -rf /tmp/gpu_check_tiny
if timeout 180 $PY -m internlm2.cli pretrain --config configs/tiny.yaml --set run_dir=/tmp/gpu_check_tiny \
    --set dtype=bfloat16 --set stages.0.steps=30 --set stages.1.steps=10 --set eval.every=20 \
    --set logging.progress=false > "$LOGS/tiny_run.log" 2>&1; then
  last=$(grep -h '"loss"' /tmp/gpu_check_tiny/metrics.jsonl | tail -1 | cut -c1-160)
  note "tiny end-to-end run (bf16, 40 steps): ok ($(elapsed $t3)); last step: $last"
else
  note "tiny end-to-end run (bf16): FAILED ($(elapsed $t3)); see tiny_run.log"
fi

: > "$LOGS/benchmarks.md"
for bench in "${BENCHMARKS[@]}"; do
  t2=$(date +%s)
  if (( t2 - t0 > BUDGET )); then
    note "benchmark $bench: skipped (past the ${BUDGET}s budget)"
    continue
  fi
  # shellcheck disable=SC2086
  if timeout 120 $PY -m $bench >> "$LOGS/benchmarks.log" 2>&1; then
    note "benchmark $bench: ok ($(elapsed $t2))"
  else
    note "benchmark $bench: FAILED ($(elapsed $t2))"
  fi
done
for f in benchmarks/results/*-h100.md benchmarks/results/*-h200.md; do
  [ -f "$f" ] && [ "$f" -nt "$LOGS/env.txt" ] && { cat "$f"; echo; } >> "$LOGS/benchmarks.md"
done

result="benchmarks/results/gpu-$STAMP-$card.md"
{
  echo "# GPU check $STAMP on $card"
  echo
  printf -- '- %s\n' "${SUMMARY[@]}"
  echo
  echo '## Failures and skips'
  echo '```'
  grep -E "^(FAILED|ERROR|SKIPPED)" "$LOGS/cuda_tests.log" | head -60
  echo '```'
  echo
  echo '## Benchmarks'
  cat "$LOGS/benchmarks.md"
} > "$result"
cp "$result" "$LOGS/summary.md"

echo
echo "================ summary ($(elapsed $t0) total) ================"
printf '%s\n' "${SUMMARY[@]}"
grep -E "^(FAILED|ERROR)" "$LOGS/cuda_tests.log" | head -15
