#!/usr/bin/env bash
# Pretraining on one node: torchrun starts N processes, each running `python -m internlm2.cli pretrain`.
#
#   scripts/launch_torchrun.sh [--nproc N] --config FILE [--set key=value ...]
#
# N is --nproc, else every GPU this process sees (CUDA_VISIBLE_DEVICES is respected). Without a GPU give
# --nproc: the processes then train on CPU with gloo. Every other argument goes to `pretrain` unchanged
# (put `--` before them if one of them is --nproc or --help). torchrun's --standalone rendezvous takes a
# free port on this host, so two runs on one node do not collide.
#
# Environment: PYTHON, the interpreter that counts GPUs (default: python); INTERNLM2_PG_TIMEOUT_S, the
# process-group timeout in seconds, reaches the trainer as is (see internlm2/train/launch_env.py).
set -euo pipefail

die() { echo "launch_torchrun.sh: error: $*" >&2; exit 2; }

nproc=""
args=()
while (($#)); do
  case $1 in
    --nproc) (($# >= 2)) || die "--nproc needs a number"; nproc=$2; shift 2 ;;
    --nproc=*) nproc=${1#*=}; shift ;;
    -h | --help) sed -n '2,12p' "$0" | cut -c3-; exit 0 ;;
    --) shift; args+=("$@"); break ;;
    *) args+=("$1"); shift ;;
  esac
done

if [[ -z $nproc ]]; then
  python=${PYTHON:-python}
  gpus=$("$python" -c 'import torch; print(torch.cuda.device_count())') \
    || die "could not count GPUs with '$python' (is torch installed?); give --nproc N"
  [[ $gpus =~ ^[0-9]+$ ]] || die "'$python' reported a GPU count that is not a number: '$gpus'"
  ((gpus > 0)) || die "no GPU visible: give the number of processes with --nproc N (they train on CPU with gloo)"
  nproc=$gpus
fi
[[ $nproc =~ ^[1-9][0-9]*$ ]] || die "--nproc must be a positive integer, got '$nproc'"

cmd=(torchrun --standalone --nnodes=1 --nproc-per-node="$nproc" -m internlm2.cli pretrain "${args[@]}")
echo "launch_torchrun.sh: $(printf '%q ' "${cmd[@]}")" >&2
exec "${cmd[@]}"
