#!/usr/bin/env bash
# Installs internlm2 from this checkout: torch (unless one is installed), the build tools, the CUTLASS
# headers, then the package itself (with everything `internlm2 pretrain` uses) built against the installed
# torch. `--test` adds the test dependencies. Before building it prints what it builds and about how long.
#
#   ./scripts/install.sh [--test]
#
# Environment: CUDA_HOME (default /usr/local/cuda when it has nvcc); INTERNLM2_CUDA_ARCHS, the CUDA
# architectures (unset: CUDA kernels only when a GPU is visible, for that GPU); INTERNLM2_SKIP_CUDA=1 for CPU
# kernels only; MAX_JOBS; PIP_VERBOSE=1 shows the compiler's progress. See README "Building for GPUs".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"

if ! $PY -c "import torch" 2>/dev/null; then
  $PY -m pip install "torch==2.14.1"
fi
$PY -m pip install --quiet "setuptools>=70" wheel "cmake>=3.26" ninja
$PY -m pip install --quiet --no-deps "nvidia-cutlass==4.2.0.0"
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
# pip shows nothing of the build but a spinner: say what is built first.
$PY internlm2/_build_plan.py
[ -n "${PIP_VERBOSE:-}" ] || echo "internlm2: (PIP_VERBOSE=1 ./scripts/install.sh shows the compiler's progress)"
# --no-build-isolation: the extension must be compiled against the torch that will import it.
$PY -m pip install --no-build-isolation -e ".$extras"
# pyenv only sees new console scripts (`internlm2`) after a rehash.
if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi
$PY -m internlm2.env
