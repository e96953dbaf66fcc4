#!/usr/bin/env bash
# One machine, all its GPUs: data parallel over a ("data", -1) mesh of every visible device.
#   bash launch/single_host_gpu.sh configs/default.py runs/gpu [--config.train.batch_size=32 ...]
# Needs the CUDA build of jaxlib once: pip install "jax[cuda13]==0.10.2"
set -euo pipefail
config=${1:?usage: single_host_gpu.sh CONFIG WORKDIR [flags...]}
workdir=${2:?usage: single_host_gpu.sh CONFIG WORKDIR [flags...]}
shift 2
# Let XLA take GPU memory as needed instead of 75 % up front, so prediction and training can share a device.
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
exec python -m urisc_jax.main --config="$config" --workdir="$workdir" "$@"
