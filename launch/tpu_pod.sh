#!/usr/bin/env bash
# A Cloud TPU VM pod slice: copies this checkout to every worker, installs the requirements there, and runs the
# same command on every worker, one process per worker, all of them one JAX job.
#   bash launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [flags...]
#   bash launch/tpu_pod.sh my-v5e-32 us-west4-a configs/default.py /mnt/shared/runs/tpu --config.train.batch_size=256
# Run it from any machine with gcloud set up for the TPU's project. CONFIG is a path inside the repository
# (e.g. configs/default.py). WORKDIR is an absolute path on a file system mounted at that same path on every worker
# (Filestore, NFS, ...): checkpoints are written by all workers together and worker 0's process writes logs,
# metrics and predictions. The script checks this before it runs anything and stops if a worker cannot see a file
# written into WORKDIR by worker 0.
#
# Steps: (1) pack the files git tracks or does not ignore into a local tarball; (2) on worker 0, create WORKDIR and
# write a check file into it; (3) scp the tarball to every worker; (4) on every worker: check the file is
# visible, unpack into ~/REMOTE_DIR (replacing the previous copy), pip install -r requirements.txt
# "jax[tpu]==0.10.2"; (5) on every worker: python -m urisc_jax.main --distributed --config=CONFIG
# --workdir=WORKDIR [flags...]. --distributed makes jax.distributed.initialize() find the other workers itself.
# Unless the flags choose them, the batches are per device (--config.train.batch_size_per_device=1 and
# --config.predict.batch_size_per_device=1: x the slice's chip count), so they split over any number of workers.
#
# Environment:
#   DRY_RUN=1      print the commands (one per line, ready to paste into bash) and run nothing
#   REMOTE_DIR     folder for the code on each worker, relative to the home folder (default: urisc_jax)
#   REMOTE_PYTHON  interpreter on the workers, Python 3.11 or newer (default: python3)
#   GCLOUD_FLAGS   extra flags for every gcloud command, split on spaces (e.g. "--project=P --internal-ip")
# The run lasts as long as the ssh sessions: start this inside tmux or screen. A preempted run (SIGTERM, e.g. TPU
# maintenance) saves a checkpoint and exits with status 143; running the same command again resumes from it.
set -euo pipefail

usage="usage: [DRY_RUN=1] bash launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [flags...]"
if (($# < 4)); then
  echo "$usage" >&2
  exit 2
fi
tpu=$1
zone=$2
config=$3
workdir=$4
shift 4

if [[ $workdir != /* ]]; then
  echo "tpu_pod.sh: WORKDIR must be an absolute path on a file system shared by all workers, not '$workdir'" >&2
  exit 2
fi
remote_dir=${REMOTE_DIR:-urisc_jax}
# It is replaced wholesale on every launch, so only plain relative paths below the home folder are accepted.
if [[ ! $remote_dir =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*$ ]]; then
  echo "tpu_pod.sh: REMOTE_DIR must be a relative path below the home folder" \
       "(letters, digits, _ . -; no part starting with a dot), not '$remote_dir'" >&2
  exit 2
fi
remote_python=${REMOTE_PYTHON:-python3}
read -r -a gcloud_flags <<<"${GCLOUD_FLAGS:-}"
dry_run=0
if [[ ${DRY_RUN:-0} != 0 ]]; then
  dry_run=1
fi

# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Runs a command line on the workers given by --worker (0 or all), in each worker's home folder.
on_workers() {
  local worker=$1 command=$2
  run gcloud compute tpus tpu-vm ssh "$tpu" "--zone=$zone" "--worker=$worker" ${gcloud_flags[@]+"${gcloud_flags[@]}"} \
    "--command=$command"
}

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if ((dry_run)); then
  tarball="${TMPDIR:-/tmp}/urisc_jax-code.tar.gz"
else
  tarball=$(mktemp "${TMPDIR:-/tmp}/urisc_jax-code.XXXXXX")
  trap 'rm -f -- "$tarball"' EXIT
fi
remote_tarball=urisc_jax-code.tar.gz
token="$workdir/.urisc-shared-check-$(date +%Y%m%d%H%M%S)-$$"

# (1) Tracked files and untracked files git does not ignore, as they are in the working tree (deleted ones left out).
# shellcheck disable=SC2016  # $1 and $2 are expanded by the bash that runs the packing script
pack='set -o pipefail; cd "$1" && git ls-files -z --cached --others --exclude-standard'\
' | while IFS= read -r -d "" f; do if [ -e "$f" ]; then printf "%s\0" "$f"; fi; done'\
' | COPYFILE_DISABLE=1 tar --null -T - -czf "$2"'
run bash -c "$pack" pack "$repo" "$tarball"

# (2) The shared-storage check file, written on worker 0.
on_workers 0 "$(quote mkdir -p -- "$workdir") && $(quote touch -- "$token")"

# (3) The code to every worker.
run gcloud compute tpus tpu-vm scp "$tarball" "$tpu:$remote_tarball" "--zone=$zone" --worker=all \
  ${gcloud_flags[@]+"${gcloud_flags[@]}"}

# (4) On every worker: the check, the code, the requirements.
unshared="tpu_pod.sh: the workdir $workdir is not shared by all workers: a file written there on worker 0 is missing"
unshared+=" on this one. Use a folder on a file system mounted at the same path on every worker (Filestore, NFS, ...)."
# Simple commands joined by ';' under set -e, so that the first one to fail stops the worker's shell (set -e does
# not stop at a failure on the left of '&&').
setup=(
  "set -e"
  "if [ ! -e $(quote "$token") ]; then sleep 2; fi"
  "if [ ! -e $(quote "$token") ]; then echo \"\$(hostname)\": $(quote "$unshared") >&2; exit 1; fi"
  "$(quote rm -rf -- "$remote_dir.new")"
  "$(quote mkdir -p -- "$remote_dir.new")"
  "$(quote tar -xzf "$remote_tarball" -C "$remote_dir.new")"
  "$(quote rm -rf -- "$remote_dir")"
  "$(quote mv -- "$remote_dir.new" "$remote_dir")"
  "$(quote rm -f -- "$remote_tarball")"
  "$(quote cd -- "$remote_dir")"
  "$(quote "$remote_python" -m pip install -q -r requirements.txt "jax[tpu]==0.10.2")"
)
on_workers all "$(IFS=';'; printf '%s' "${setup[*]}")"

# (5) The run, on every worker at once, with per-device batches unless the flags choose the batches.
per_device_batches "$@"
on_workers all "$(quote rm -f -- "$token"); $(quote cd -- "$remote_dir") && exec $(quote "$remote_python" \
  -m urisc_jax.main --distributed "--config=$config" "--workdir=$workdir" ${batch_flags[@]+"${batch_flags[@]}"} "$@")"
