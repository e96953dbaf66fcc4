#!/usr/bin/env bash
# One machine, all its GPUs: one process drives every visible GPU, data parallel over a ("data", -1) mesh.
#   bash launch/single_host_gpu.sh CONFIG WORKDIR [flags...]
#   bash launch/single_host_gpu.sh configs/default.py runs/gpu --config.train.batch_size=32
# Run it from the repository root, with the Python environment that has requirements.txt installed, plus the CUDA
# build of jaxlib once: pip install "jax[cuda12]==0.10.2" (CUDA 12) or pip install "jax[cuda13]==0.10.2" (CUDA 13).
# Environment:
#   DRY_RUN=1   print the command (one line, ready to paste into bash) and run nothing
#   PYTHON      the interpreter to run (default: python)
#   XLA_PYTHON_CLIENT_PREALLOCATE  default false: XLA takes GPU memory as needed instead of 75 % up front
# A stopped run (SIGTERM) saves a checkpoint and exits with status 143; the same command resumes it.
set -euo pipefail

usage="usage: [DRY_RUN=1] bash launch/single_host_gpu.sh CONFIG WORKDIR [flags...]"
if (($# < 2)); then
  echo "$usage" >&2
  exit 2
fi
config=$1
workdir=$2
shift 2

# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

cmd=(env "XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
     "${PYTHON:-python}" -m urisc_jax.main "--config=$config" "--workdir=$workdir" "$@")
if [[ ${DRY_RUN:-0} != 0 ]]; then
  quote "${cmd[@]}"
  exit 0
fi
exec "${cmd[@]}"
