"""One run per workdir: an exclusive lock that a run holds on its folder while it works there.

Two runs in one workdir interleave their metrics.jsonl, race orbax for the same checkpoint steps and overwrite each
other's predictions. The lock is `flock` on `workdir/.lock` (released by the kernel when the process ends, however it
ends, so a lock left by a crashed run is found stale and taken over); the file names the holder (host, pid, start,
command) for the message the second run prints. In a multi-host run process 0 holds it for the job.
"""

import contextlib
import fcntl
import json
import logging
import os
import pathlib
import socket
import sys
import time

LOCK_FILE = ".lock"


class WorkdirBusyError(RuntimeError):
  """Another run holds the workdir."""


def _holder(fd: int) -> dict:
  try:
    os.lseek(fd, 0, os.SEEK_SET)
    return json.loads(os.read(fd, 65536).decode() or "{}")
  except (OSError, ValueError):
    return {}


def _describe(holder: dict) -> str:
  if not holder:
    return "another run"
  return (f"the run started {holder.get('started', '?')} on host {holder.get('host', '?')} as process "
          f"{holder.get('pid', '?')} ({holder.get('command', '?')})")


@contextlib.contextmanager
def exclusive(workdir: str | pathlib.Path):
  """Holds the workdir's lock for the block; raises WorkdirBusyError at once if another run holds it."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / LOCK_FILE
  try:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
  except OSError as e:
    raise WorkdirBusyError(f"cannot open the lock file {path} ({e.strerror}); remove it if it is a symlink, or use "
                           "another --workdir.") from e
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise WorkdirBusyError(f"{workdir} is in use by {_describe(_holder(fd))}. Wait for it to finish (or stop it), "
                             "or give this run another --workdir.") from None
    previous = _holder(fd)
    if previous:  # The kernel dropped that holder's lock: its process ended without tidying up.
      logging.warning("taking over the stale lock of %s in %s", _describe(previous), workdir)
    record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join(sys.argv)[:500]}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(record).encode())
    try:
      yield
    finally:
      os.ftruncate(fd, 0)  # an empty lock file: released cleanly
  finally:
    os.close(fd)  # releases the flock
