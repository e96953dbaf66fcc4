"""Several processes, one run: joining the job, deciding once for all hosts, gathering results, stopping together.

A multi-process run (SLURM with one process per GPU, a TPU pod slice with one per worker, or N processes on one
machine with CPU collectives) is one JAX job: every process runs the same program on its share of the batch, and
the collectives (gradient all-reduce, the gathered prediction tiles) keep them in step. Everything else has to be
kept in step by hand, and lives here:

- joining: `distributed_options` turns the command line and the environment into `jax.distributed.initialize`'s
  arguments (or None for a single process), and `initialize` joins within a deadline or exits with one line;
- deciding once: `broadcast_object` hands process 0's value (a validation score, a threshold) to every process,
  so that a collective operation (an orbax save) is entered by all processes or by none;
- gathering: `gather_objects` collects a value from every process (attribution results) on every process;
- ordering: `first_then_others` lets process 0 write shared files (the synthetic dataset, the decode cache) before
  the others read them; `process_0_drives` lets process 0 alone do work that has its own workers (a volume on Dask)
  while the others wait for its outcome;
- stopping: `StopRequest` turns SIGTERM on any process into a stop that every process takes at the same step.

Only process 0 writes logs, metrics and predictions (`is_writer`); checkpoints are written by all together.
"""

import os
import pickle
import signal
import socket
import sys
import threading
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

# Exit status of a run that was asked to stop (SIGTERM), saved a checkpoint and can be resumed: 128 + SIGTERM, what
# a shell reports for a process that SIGTERM ended. Launchers and schedulers can requeue on it.
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM


# How long a process waits for all processes of the job to join (--initialization_timeout_s). Processes that one
# launcher (srun, a pod) starts join within seconds; 2 minutes leave room for slow hosts, and a process whose peers
# never come (a wrong address, port or --num_processes, a peer that was never started) is told so in 2 minutes
# instead of hanging for JAX's 5.
INITIALIZATION_TIMEOUT_S = 120
# Exit status of a process whose job could not be joined: the flags (or the launch) do not describe a job that
# exists, which only the user can fix, so it is reported like any other input error: one line, status 2.
JOIN_FAILED_EXIT_CODE = 2


class Preempted(Exception):
  """Training stopped at a SIGTERM after saving a checkpoint; rerunning the same command resumes from it."""


class ProcessZeroFailed(Exception):
  """Process 0 failed the work it did alone for the job (see `process_0_drives`); its own output says why.

  Attributes:
    input_error: whether process 0 failed on an input error (which it reported with exit status 2).
  """

  def __init__(self, message: str, input_error: bool = False):
    super().__init__(message)
    self.input_error = input_error


def check_coordinator_address(address: str) -> None:
  """Raises ValueError (naming the flag and the form) unless `address` is HOST:PORT, e.g. 10.0.0.1:1234.

  JAX takes any string and only fails minutes later, in the C++ client, on a missing port or a URL scheme.
  """
  parsed = urllib.parse.urlsplit(f"//{address}")
  try:
    port = parsed.port
  except ValueError:
    port = None
  if "://" in address or not parsed.hostname or port is None or not 0 < port < 65536 or \
      parsed.path or parsed.query or parsed.fragment or parsed.username:
    raise ValueError(f"--coordinator_address={address!r}: give process 0's HOST:PORT, e.g. 10.0.0.1:1234 or "
                     "[::1]:1234 (no scheme such as http://, a port in 1..65535, the same on every process).")


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
    check_coordinator_address(coordinator_address)
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


def initialize(options: dict | None, timeout_s: float = INITIALIZATION_TIMEOUT_S) -> None:
  """Joins the job `distributed_options` described (before any other JAX call); nothing for a single process.

  A process whose peers do not all join within `timeout_s` seconds prints one line (the coordinator, this process's
  id and count, the fix) and exits with JOIN_FAILED_EXIT_CODE. JAX's own deadline (initialization_timeout) ends in a
  C++ abort with a stack trace (status 134) that Python cannot catch, so a watchdog thread gives up first (the
  wait in JAX's client releases the GIL) and JAX's deadline is set later, as a backstop.
  """
  if options is None:
    return
  if not timeout_s > 0:
    raise ValueError(f"--initialization_timeout_s={timeout_s}: must be a positive number of seconds.")
  joined = threading.Event()
  watchdog = threading.Thread(target=_exit_unless_joined, args=(joined, timeout_s, options), daemon=True,
                              name="join-deadline")
  watchdog.start()
  try:
    jax.distributed.initialize(**options, initialization_timeout=int(timeout_s) + max(30, int(timeout_s)))
  except ValueError as e:
    if options:
      raise
    raise ValueError(f"--distributed: JAX found no multi-process job to join here ({e}). Under SLURM start one "
                     "process per GPU with srun (launch/slurm_multinode.sbatch); elsewhere pass "
                     "--coordinator_address=HOST:PORT --num_processes=N --process_id=I, or leave --distributed "
                     "out for a single process.") from e
  finally:
    joined.set()


def _coordinator_listens(address: str, timeout_s: float = 2.0) -> bool:
  """Whether something accepts TCP connections at HOST:PORT (process 0's coordinator, once it has started)."""
  parsed = urllib.parse.urlsplit(f"//{address}")
  try:
    with socket.create_connection((parsed.hostname, parsed.port), timeout=timeout_s):
      return True
  except (OSError, ValueError, TypeError):
    return False


def join_failure_message(options: dict, timeout_s: float) -> str:
  """The one line of a process that could not join its job within `timeout_s`: what was waited for and the fix."""
  address = options.get("coordinator_address")
  if address is None:  # --distributed: the cluster's environment named the job
    return (f"error: the multi-process job JAX found (--distributed) did not come together within {timeout_s:g} s "
            "(--initialization_timeout_s): check that every process of the job was started, or raise the deadline.")
  process_id, count = options["process_id"], options["num_processes"]
  if process_id == 0:
    why = "process 1 did not join" if count == 2 else f"the other {count - 1} processes did not all join"
  elif _coordinator_listens(address):
    why = "the coordinator answers there, but not all processes joined"
  else:
    why = "nothing listens there: process 0 was not started, or listens at another address"
  return (f"error: process {process_id} of {count} waited {timeout_s:g} s (--initialization_timeout_s) for the job "
          f"at --coordinator_address={address}: {why}. Start all {count} processes with the same "
          f"--coordinator_address (process 0's HOST:PORT) and --num_processes={count}, each with its own "
          "--process_id, or raise --initialization_timeout_s.")


def _exit_unless_joined(joined: threading.Event, timeout_s: float, options: dict) -> None:
  if not joined.wait(timeout_s):
    print(join_failure_message(options, timeout_s), file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(JOIN_FAILED_EXIT_CODE)  # the main thread is inside JAX's C++ client: no exception can reach it


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


# How often a process waiting in `process_0_drives` asks again (each ask is one blocking call to the coordinator).
_POLL_MS = 60_000


def process_0_drives(fn: Callable[[], Any], name: str, *, input_errors: tuple[type[BaseException], ...] = ()) -> Any:
  """fn() on every process, for work that process 0 alone completes (a volume predicted on its Dask cluster into
  one output): fn returns early on the other processes (after any collective step, e.g. restoring a checkpoint
  together), which then wait until process 0 has finished, so that the job ends when the work does and every
  process reports its outcome.

  The wait goes through JAX's coordination service (a key process 0 sets), not a device collective: it may last
  hours, longer than collectives wait. A process 0 that dies takes the coordination service with it, which ends
  the others too.

  Returns:
    fn()'s result on process 0; on the others, what fn returned there.

  Raises:
    ProcessZeroFailed: on the other processes, when fn raised on process 0 (input_error: one of `input_errors`).
  """
  if jax.process_count() == 1:
    return fn()
  from jax._src import distributed  # pylint: disable=g-import-not-at-top  # the coordination service's client
  client, key = distributed.global_state.client, f"urisc_jax/{name}/outcome"
  if is_writer():
    outcome = "failed"
    try:
      result = fn()
      outcome = "done"
      return result
    except input_errors as e:
      outcome = f"input_error:{e}"
      raise
    except BaseException as e:
      outcome = f"failed:{type(e).__name__}: {e}"
      raise
    finally:
      client.key_value_set(key, outcome)
  result = fn()
  print(f"process {jax.process_index()}: process 0 does {name} for the job; waiting for it to finish.",
        file=sys.stderr, flush=True)
  while True:
    try:
      outcome = client.blocking_key_value_get(key, _POLL_MS)
      break
    except Exception as e:  # pylint: disable=broad-except
      if "DEADLINE_EXCEEDED" not in str(e):  # not merely "not set yet": the coordination service failed
        raise
  if outcome != "done":
    kind, _, message = outcome.partition(":")
    raise ProcessZeroFailed(f"process 0 stopped {name}: {message.splitlines()[0] if message else kind}",
                            input_error=kind == "input_error")
  return result


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
