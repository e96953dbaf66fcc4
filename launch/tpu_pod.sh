#!/usr/bin/env bash
# A Cloud TPU VM pod slice: the same command on every worker; jax.distributed.initialize() finds the others
# (TPU_WORKER_HOSTNAMES lists several workers).
#   bash launch/tpu_pod.sh TPU_NAME ZONE configs/default.py /mnt/shared/runs/tpu [--config...]
# The workdir must be a shared file system mounted at the same path on every worker (e.g. Filestore / NFS).
set -euo pipefail
tpu=${1:?usage: tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [flags...]}
zone=${2:?usage: tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [flags...]}
config=${3:?usage: tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [flags...]}
workdir=${4:?usage: tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [flags...]}
shift 4
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="
  cd ~/urisc_jax && pip install -q -r requirements.txt 'jax[tpu]==0.10.2' &&
  python -m urisc_jax.main --config=$config --workdir=$workdir $*"
