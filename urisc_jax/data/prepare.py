"""Decode-once cache: each image and label becomes a memory-mappable .npy, so a crop costs a copy, not a PNG decode.

A cache entry is named by a hash of the source files' bytes and the label settings, so an edited source file gets a
new entry. Entries are written to a temporary name and renamed into place: a crash mid-write never leaves a file that
looks like a complete entry.
"""

import dataclasses
import hashlib
import os
import pathlib

import numpy as np
from tqdm import tqdm

from urisc_jax import outputs
from urisc_jax.data import sources

_CACHE_VERSION = "1"


@dataclasses.dataclass(frozen=True)
class PreparedImage:
  """One decoded image (and its label) in the cache.

  Attributes:
    name: the source image's stem, used to name predictions.
    image_path: .npy of uint8 gray [H, W].
    label_path: .npy of uint8 membrane mask [H, W] (1 = membrane), or None for unlabelled images.
    shape: (H, W).
    source_image: the original image file.
    source_label: the original label file, or None.
  """
  name: str
  image_path: str
  label_path: str | None
  shape: tuple[int, int]
  source_image: str
  source_label: str | None

  def image(self) -> np.ndarray:
    """uint8 [H, W], memory-mapped read-only."""
    return np.load(self.image_path, mmap_mode="r")

  def label(self) -> np.ndarray:
    """uint8 [H, W] with 1 = membrane, memory-mapped read-only."""
    if self.label_path is None:
      raise ValueError(f"Image {self.source_image} has no label.")
    return np.load(self.label_path, mmap_mode="r")


def _file_digest(path: str, digest) -> None:
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      digest.update(chunk)


def cache_key(pair: sources.ImagePair, label_settings: dict) -> str:
  """Hex key from the bytes of the image and label files and the settings that shape the decoded label."""
  digest = hashlib.sha256(_CACHE_VERSION.encode())
  _file_digest(str(pair.image_path), digest)
  if pair.label_path is not None:
    _file_digest(str(pair.label_path), digest)
  digest.update(repr(sorted(label_settings.items())).encode())
  return digest.hexdigest()[:32]


def _save_atomic(path: pathlib.Path, array: np.ndarray) -> None:
  with outputs.atomic_path(path) as tmp, open(tmp, "wb") as f:
    np.save(f, array)


def prepare_pairs(
    pairs: list[sources.ImagePair],
    cache_dir: str | os.PathLike,
    *,
    membrane: str = "black",
    threshold: int | None = None,
    progress: bool = True,
) -> list[PreparedImage]:
  """Decodes every pair into the cache (reusing valid entries) and returns memory-mappable handles.

  Args:
    pairs: image/label file pairs from `sources`.
    cache_dir: folder for the .npy entries; created if missing.
    membrane: label polarity passed to `sources.load_pair` ("black" or "white").
    threshold: gray level at or below which a non-binary label counts as membrane (black polarity), or None.
    progress: show a progress bar.

  Returns:
    One PreparedImage per pair, in order.
  """
  cache_dir = pathlib.Path(cache_dir)
  cache_dir.mkdir(parents=True, exist_ok=True)
  settings = {"membrane": membrane, "threshold": threshold}
  prepared = []
  for pair in tqdm(pairs, desc="prepare", unit="image", disable=not progress or len(pairs) < 2):
    key = cache_key(pair, settings)
    image_path = cache_dir / f"{key}.image.npy"
    label_path = cache_dir / f"{key}.label.npy" if pair.label_path is not None else None
    if not image_path.exists() or (label_path is not None and not label_path.exists()):
      if pair.label_path is None:
        image, membrane_mask = sources.read_image(pair.image_path), None
      else:
        image, membrane_mask = sources.load_pair(pair, membrane=membrane, threshold=threshold)
      if label_path is not None:
        _save_atomic(label_path, membrane_mask.astype(np.uint8))
      _save_atomic(image_path, np.ascontiguousarray(image, np.uint8))
    shape = np.load(image_path, mmap_mode="r").shape
    prepared.append(PreparedImage(
        name=pair.name, image_path=str(image_path), label_path=None if label_path is None else str(label_path),
        shape=(int(shape[0]), int(shape[1])), source_image=str(pair.image_path),
        source_label=None if pair.label_path is None else str(pair.label_path)))
  return prepared
