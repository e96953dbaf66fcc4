"""Writing result files atomically: a temporary name in the same folder, then a rename.

A run killed mid-write leaves at most a `*.tmp` file, never a truncated TIFF, PNG or JSON under the final name. The
rename replaces the directory entry, so a result file that is a symlink is replaced by a regular file and the file it
pointed to is never written; logs appended as they grow (`open_log`) refuse a symlink instead. Every result file
the project writes goes through this module.
"""

import contextlib
import json
import math
import os
import pathlib
import tempfile
from typing import Any

import numpy as np
import tifffile
from PIL import Image


@contextlib.contextmanager
def atomic_path(path: str | pathlib.Path):
  """Yields a temporary path beside `path`; renames it to `path` if the block succeeds, deletes it otherwise."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f"{path.suffix}.tmp")
  os.close(fd)
  try:
    yield pathlib.Path(tmp)
    # mkstemp creates owner-only files; give the result the permissions any new file would get (umask applies),
    # so colleagues on a shared cluster can read predictions and reports.
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def json_safe(value: Any) -> Any:
  """`value` with non-finite floats replaced by None and numpy scalars by Python numbers: standard JSON."""
  if isinstance(value, (float, np.floating)):
    return float(value) if math.isfinite(value) else None
  if isinstance(value, np.integer):
    return int(value)
  if isinstance(value, dict):
    return {k: json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  return value


def write_json(path: str | pathlib.Path, payload: dict) -> None:
  """Standard JSON (NaN and infinities become null), written atomically."""
  with atomic_path(path) as tmp:
    tmp.write_text(json.dumps(json_safe(payload), indent=2, sort_keys=True) + "\n")


def write_bytes(path: str | pathlib.Path, data: bytes) -> None:
  """Writes `data` to `path` atomically (exported models, serialized programs)."""
  with atomic_path(path) as tmp:
    tmp.write_bytes(data)


def write_text(path: str | pathlib.Path, text: str) -> None:
  """A text file (a report, the resolved config), written atomically."""
  with atomic_path(path) as tmp:
    tmp.write_text(text, encoding="utf-8")


def append_line(path: str | pathlib.Path, line: str) -> None:
  """`path` with `line` added at the end, written atomically: for small records of each run (command.txt)."""
  path = pathlib.Path(path)
  previous = path.read_text(encoding="utf-8") if path.is_file() and not path.is_symlink() else ""
  write_text(path, previous + line.rstrip("\n") + "\n")


def open_log(path: str | pathlib.Path):
  """A text file opened for appending lines as a run goes (metrics.jsonl), created if missing; refuses a symlink.

  Appending is not atomic per line by nature; readers skip a torn last line. O_NOFOLLOW keeps the log from writing
  through a symlink into another file.
  """
  path = pathlib.Path(path)
  try:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
  except OSError as e:
    if path.is_symlink():
      raise OSError(f"{path} is a symlink; refusing to append the run's log through it. Remove the link (or use "
                    "another --workdir).") from e
    raise
  return os.fdopen(fd, "a", encoding="utf-8")


def write_tiff(path: str | pathlib.Path, array: np.ndarray) -> None:
  """A single-page TIFF of a 2-D array (uint8 submission or float32 probabilities), deflate-compressed."""
  with atomic_path(path) as tmp:
    tifffile.imwrite(tmp, np.asarray(array), compression="zlib")


def write_png(path: str | pathlib.Path, array: np.ndarray) -> None:
  """An 8-bit PNG of a gray [H, W] or RGB [H, W, 3] uint8 array."""
  with atomic_path(path) as tmp:
    Image.fromarray(np.asarray(array, np.uint8)).save(tmp, format="PNG")
