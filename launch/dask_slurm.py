"""Blockwise volume prediction on a SLURM cluster: dask-jobqueue submits the Dask workers as SLURM jobs.

    python launch/dask_slurm.py --config=configs/default.py --workdir=runs/track1 \
        --config.predict.input=/data/em.zarr --config.predict.output=/data/membranes.zarr \
        --jobs=8 --cores=8 --memory=64GB --partition=gpu --gpus_per_job=1 [--dry_run]

This process is the driver: it starts a Dask scheduler here, asks SLURM for `--jobs` jobs of one worker each (one
GPU with `--gpus_per_job=1`, else the job's CPU cores), and runs `urisc_jax.volume_predict.predict_volume` on them.
Workers join as SLURM starts them, and blocks flow to whichever are up; a job that ends or is preempted loses only
its running blocks, which go to the others. Rerunning the same command resumes: finished blocks are skipped. The
input, the output and the workdir must be on a file system that every node sees.

`--dry_run` prints the SLURM job script and submits nothing. Needs `pip install dask-jobqueue==0.9.0` (pinned in
requirements.txt). With a scheduler started some other way, pass its address instead:
`python -m urisc_jax.main --mode=predict ... --config.predict.dask.address=tcp://HOST:8786`.
"""

import json
import logging
import pathlib
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the repository root, for urisc_jax

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/default.py.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The trained run: its latest checkpoint predicts.")
_JOBS = flags.DEFINE_integer("jobs", 4, "SLURM jobs, one Dask worker each.")
_CORES = flags.DEFINE_integer("cores", 8, "CPU cores per job.")
_MEMORY = flags.DEFINE_string("memory", "32GB", "Memory per job.")
_PARTITION = flags.DEFINE_string("partition", "", "SLURM partition (queue); empty = the cluster's default.")
_ACCOUNT = flags.DEFINE_string("account", "", "SLURM account; empty = none.")
_WALLTIME = flags.DEFINE_string("walltime", "04:00:00", "Time limit per job.")
_GPUS = flags.DEFINE_integer("gpus_per_job", 0, "GPUs per job (--gres=gpu:N); 0 = CPU jobs.")
_PYTHON = flags.DEFINE_string("python", sys.executable, "The Python of the environment the jobs run in.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the SLURM job script and submit nothing.")


def make_cluster():
  """The SLURMCluster: one single-threaded Dask worker per job (a worker runs one block at a time)."""
  from dask_jobqueue import SLURMCluster  # pylint: disable=g-import-not-at-top
  directives = [f"--gres=gpu:{_GPUS.value}"] if _GPUS.value else []
  prologue = ["export XLA_PYTHON_CLIENT_PREALLOCATE=false"]
  # cores=1: one Dask thread per worker (one block at a time); job_cpu: the cores SLURM gives the job, which XLA uses.
  return SLURMCluster(cores=1, job_cpu=_CORES.value, processes=1, memory=_MEMORY.value, walltime=_WALLTIME.value,
                      queue=_PARTITION.value or None, account=_ACCOUNT.value or None, python=_PYTHON.value,
                      job_extra_directives=directives, job_script_prologue=prologue)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise app.UsageError("Pass --config=configs/<name>.py and --workdir=DIR (the trained run).")
  from urisc_jax import xla_flags  # pylint: disable=g-import-not-at-top
  # The project's XLA:CPU options, as `python -m urisc_jax.main` runs with: sbatch passes this environment on to the
  # workers' jobs (SLURM's default --export=ALL).
  xla_flags.apply()
  import distributed  # pylint: disable=g-import-not-at-top,unused-import  # (sets its log levels on import)
  logging.getLogger("distributed").setLevel(logging.WARNING)  # not every worker's arrival
  cluster = make_cluster()
  if _DRY_RUN.value:
    print(cluster.job_script())
    cluster.close()
    return
  from distributed import Client  # pylint: disable=g-import-not-at-top

  from urisc_jax import config_checks, volume_predict  # pylint: disable=g-import-not-at-top
  config_checks.validate(_CONFIG.value, "predict")
  with cluster, Client(cluster) as client:
    cluster.scale(jobs=_JOBS.value)
    print(f"Dask scheduler at {cluster.scheduler_address}; {_JOBS.value} SLURM jobs requested", file=sys.stderr)
    summary = volume_predict.predict_volume(_CONFIG.value, pathlib.Path(_WORKDIR.value), client=client)
  print(json.dumps(summary, indent=2, sort_keys=True))


if __name__ == "__main__":
  app.run(main)
