"""Writing result files atomically: a temporary name in the same folder, then a rename.

A run killed mid-write leaves at most a `*.tmp` file, never a truncated TIFF, PNG or JSON under the final name.
"""

import contextlib
import json
import os
import pathlib
import tempfile

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
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


def write_json(path: str | pathlib.Path, payload: dict) -> None:
  with atomic_path(path) as tmp:
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=float) + "\n")


def write_tiff(path: str | pathlib.Path, array: np.ndarray) -> None:
  """A single-page TIFF of a 2-D array (uint8 submission or float32 probabilities), deflate-compressed."""
  with atomic_path(path) as tmp:
    tifffile.imwrite(tmp, np.asarray(array), compression="zlib")


def write_png(path: str | pathlib.Path, array: np.ndarray) -> None:
  """An 8-bit PNG of a gray [H, W] or RGB [H, W, 3] uint8 array."""
  with atomic_path(path) as tmp:
    Image.fromarray(np.asarray(array, np.uint8)).save(tmp, format="PNG")
