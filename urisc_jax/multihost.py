"""Several processes, one run: joining the job, deciding once for all hosts, gathering results, stopping together.

A multi-process run (SLURM with one process per GPU, a TPU pod slice with one per worker, or N processes on one
machine with CPU collectives) is one JAX job: every process runs the same program on its share of the batch, and
the collectives (gradient all-reduce, the gathered prediction tiles) keep them in step. Everything else has to be
kept in step by hand, and lives here:

- joining: `distributed_options` turns the command line and the environment into `jax.distributed.initialize`'s
  arguments (or None for a single process);
- deciding once: `broadcast_object` hands process 0's value (a validation score, a threshold) to every process,
  so that a collective operation (an orbax save) is entered by all processes or by none;
- gathering: `gather_objects` collects a value from every process (attribution results) on every process;
- ordering: `first_then_others` lets process 0 write shared files (the synthetic dataset, the decode cache) before
  the others read them;
- stopping: `StopRequest` turns SIGTERM on any process into a stop that every process takes at the same step.

Only process 0 writes logs, metrics and predictions (`is_writer`); checkpoints are written by all together.
"""

import os
import pickle
import signal
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

# Exit status of a run that was asked to stop (SIGTERM), saved a checkpoint and can be resumed: 128 + SIGTERM, what
# a shell reports for a process that SIGTERM ended. Launchers and schedulers can requeue on it.
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM


class Preempted(Exception):
  """Training stopped at a SIGTERM after saving a checkpoint; rerunning the same command resumes from it."""


def distributed_options(*, distributed: bool = False, coordinator_address: str = "", num_processes: int = 0,
                        process_id: int = -1, local_device_ids: str = "",
                        environ: Mapping[str, str] = os.environ) -> dict | None:
  """The keyword arguments of `jax.distributed.initialize` for this process, or None for a single-process run.

  Args:
    distributed: --distributed: join a multi-process job found by JAX's own cluster detection (SLURM, Cloud TPU VM
      pod slices, Open MPI, Kubernetes...): no arguments.
    coordinator_address: --coordinator_address=HOST:PORT, with num_processes and process_id: an explicit job, e.g.
      N processes on one machine.
    num_processes: --num_processes.
    process_id: --process_id, in [0, num_processes).
    local_device_ids: --local_device_ids, e.g. "0,1": the local devices this process drives (default: JAX's
      choice).
    environ: the environment; without flags, a job it describes (JAX_COORDINATOR_ADDRESS, or a SLURM step of
      several tasks) is joined with JAX's detection, as --distributed would.

  Raises:
    ValueError: explicit options that do not go together, naming the flags.
  """
  explicit = bool(coordinator_address) or num_processes > 0 or process_id >= 0
  if explicit:
    if not (coordinator_address and num_processes > 0 and 0 <= process_id < num_processes):
      raise ValueError(
          "a multi-process run needs all of --coordinator_address=HOST:PORT, --num_processes=N and "
          f"--process_id=I with 0 <= I < N (got {coordinator_address!r}, {num_processes}, {process_id}); or pass "
          "--distributed alone to let JAX find the job (SLURM, Cloud TPU pods).")
    options = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
  elif distributed or environ.get("JAX_COORDINATOR_ADDRESS") or int(environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
    options = {}
  else:
    return None
  if local_device_ids:
    try:
      options["local_device_ids"] = [int(i) for i in local_device_ids.split(",")]
    except ValueError as e:
      raise ValueError(f"--local_device_ids={local_device_ids!r}: give device numbers separated by commas, "
                       "e.g. 0,1,2,3.") from e
  return options


def initialize(options: dict | None) -> None:
  """Joins the job `distributed_options` described (before any other JAX call); nothing for a single process."""
  if options is None:
    return
  try:
    jax.distributed.initialize(**options)
  except ValueError as e:
    if options:
      raise
    raise ValueError(f"--distributed: JAX found no multi-process job to join here ({e}). Under SLURM start one "
                     "process per GPU with srun (launch/slurm_multinode.sbatch); elsewhere pass "
                     "--coordinator_address=HOST:PORT --num_processes=N --process_id=I, or leave --distributed "
                     "out for a single process.") from e


def is_writer() -> bool:
  """Whether this process writes the run's logs, metrics and predictions: process 0 only."""
  return jax.process_index() == 0


def sync(name: str) -> None:
  """Waits until every process has reached the barrier `name` (nothing for a single process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def first_then_others(fn: Callable[[], Any], name: str) -> Any:
  """fn() on process 0, then, once it is done, on the other processes: for work that writes shared files (a dataset,
  the decode cache) that the other processes then find in place instead of writing them at the same time."""
  if is_writer():
    result = fn()
    sync(f"{name}:done")
    return result
  sync(f"{name}:done")
  return fn()


def _allgather_bytes(data: bytes) -> list[bytes]:
  buffer = np.frombuffer(data, np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.array([buffer.size], np.int32))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:buffer.size] = buffer
  stacked = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
  return [stacked[i, :size].tobytes() for i, size in enumerate(sizes)]


def gather_objects(value: Any) -> list[Any]:
  """Every process's `value`, in process order, on every process (a collective: all processes must call it).

  Values travel pickled between the processes of this run, which run this program: pickle is safe here because
  nothing outside the job supplies the bytes.
  """
  if jax.process_count() == 1:
    return [value]
  return [pickle.loads(data) for data in _allgather_bytes(pickle.dumps(value))]


def broadcast_object(value: Any) -> Any:
  """Process 0's `value` on every process (a collective: all processes must call it), so that a decision taken on
  it (save the best checkpoint, which threshold) is the same everywhere."""
  if jax.process_count() == 1:
    return value
  data = pickle.dumps(value) if is_writer() else b""
  size = int(multihost_utils.broadcast_one_to_all(np.array(len(data), np.int32)))
  buffer = np.zeros(size, np.uint8)
  if is_writer():
    buffer[:] = np.frombuffer(data, np.uint8)
  return pickle.loads(np.asarray(multihost_utils.broadcast_one_to_all(buffer)).tobytes())


class StopRequest:
  """SIGTERM (preemption, scancel, a time limit) turned into a stop that all processes take after the same step.

  One process: a SIGTERM handler sets a flag that `should_stop` reads after each step. Several processes: JAX's
  preemption service (started by `jax.distributed.initialize`) catches SIGTERM on any process and tells the others
  through the coordinator; `multihost_utils.reached_preemption_sync_point` then turns True on every process at the
  same step, so that all save the same checkpoint together and none is left waiting in a collective for a process
  that has gone. Use as a context manager around the training loop and call `should_stop(step)` after every step.
  """

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if jax.process_count() == 1:
      try:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
      except ValueError:  # Not the main thread: leave signals alone.
        self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def should_stop(self, step: int) -> bool:
    """Whether to save and stop after `step` (all processes get the same answer at the same step)."""
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
