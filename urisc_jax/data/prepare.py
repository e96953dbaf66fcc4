"""Decode-once cache: each image and label becomes a memory-mappable .npy, so a crop costs a copy, not a PNG decode.

An entry is a folder `<key>/` holding `image.npy` (uint8 [H, W]) and, for a labelled image, `label.npy` (uint8 [H, W],
1 = membrane). The key hashes the source files' bytes, the page of a TIFF stack and the label settings, so an edited
source file gets a new entry and a new polarity or threshold never reuses a mask decoded under the old one.

An entry is written into a hidden temporary folder and renamed into place in one step, so a crash mid-write leaves no
entry (at most a hidden `.<key>.*.tmp` folder, which a later run deletes once it is a day old), and two hosts that
prepare the same entry on a shared disk both succeed.

Hashing a 100 MB U-RISC image takes a noticeable fraction of a second, so `index.json` remembers each file's digest
under its (size, mtime, ctime, inode): a re-run neither decodes nor hashes unchanged files, and any write to a file
changes its stamp and gets it hashed again. Digests of files written in the last few seconds are not remembered,
since a second write within the same clock tick would leave the stamp unchanged.
"""

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence

import numpy as np
from tqdm import tqdm

from urisc_jax import outputs
from urisc_jax.data import sources

_CACHE_VERSION = "2"
INDEX_FILE = "index.json"
IMAGE_FILE = "image.npy"
LABEL_FILE = "label.npy"
METADATA_FILE = "meta.json"
# A digest is remembered only for files whose stamp is older than this when hashing starts (see module docstring).
_RACY_WINDOW_NS = 3_000_000_000
_STALE_TMP_SECONDS = 24 * 3600

Pair = sources.ImagePair | sources.StackSlice


@dataclasses.dataclass(frozen=True)
class PreparedImage:
  """One decoded image (and its label) in the cache.

  Attributes:
    name: the source image's stem, used to name predictions.
    image_path: .npy of uint8 gray [H, W].
    label_path: .npy of uint8 membrane mask [H, W] (1 = membrane), or None for unlabelled images.
    shape: (H, W).
    source_image: the original image file (or a description of the record it came from).
    source_label: the original label file, or None.
    source_page: the page of `source_image` / `source_label` for slices of a TIFF stack, else None.
  """
  name: str
  image_path: str
  label_path: str | None
  shape: tuple[int, int]
  source_image: str
  source_label: str | None
  source_page: int | None = None

  def image(self) -> np.ndarray:
    """uint8 [H, W], memory-mapped read-only."""
    return np.load(self.image_path, mmap_mode="r")

  def label(self) -> np.ndarray:
    """uint8 [H, W] with 1 = membrane, memory-mapped read-only."""
    if self.label_path is None:
      raise ValueError(f"Image {self.source_image} has no label.")
    return np.load(self.label_path, mmap_mode="r")

  def official_label(self) -> np.ndarray:
    """uint8 [H, W] ground truth as the official scorer reads it: black (0) = membrane, white (255) = background.

    Works for every source (label files, slices of TIFF stacks, TFDS records). For a binary label file in the
    official polarity (U-RISC Track 1, ISBI 2012) this is the file's content byte for byte: decoding such a label
    refuses any gray level but 0 and 255, so the mask holds all of it, and rebuilding skips re-reading a 100 MB TIFF.
    A label decoded with another polarity or a threshold (Track 2) comes back binarized in the official polarity.
    """
    return np.where(np.asarray(self.label()) != 0, np.uint8(0), np.uint8(255))


def _hash_file(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      digest.update(chunk)
  return digest.hexdigest()


class DigestIndex:
  """sha256 of source files, remembered in a JSON file under each file's (size, mtime, ctime, inode)."""

  def __init__(self, path: str | os.PathLike | None):
    self.path = None if path is None else pathlib.Path(path)
    self._entries: dict[str, list] = {}
    self._this_run: dict[str, list] = {}  # also racy ones: the pages of a stack share one file
    self._dirty = False
    if self.path is not None and self.path.is_file():
      try:
        entries = json.loads(self.path.read_text())
        self._entries = entries if isinstance(entries, dict) else {}
      except (OSError, ValueError):
        self._entries = {}  # A damaged index only costs re-hashing; it never decides an entry's content.

  def digest(self, path: str | os.PathLike) -> str:
    """Hex sha256 of the file's bytes, hashing it only when its stamp changed since it was last hashed."""
    path = pathlib.Path(path).resolve()
    try:
      st = path.stat()
    except FileNotFoundError:
      raise sources.MissingDataError(f"source file {path} does not exist (it was listed, then removed?).") from None
    stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    for known in (self._this_run.get(str(path)), self._entries.get(str(path))):
      if known is not None and known[:4] == stamp:
        return known[4]
    started = time.time_ns()
    digest = _hash_file(path)
    self._this_run[str(path)] = stamp + [digest]
    if started - max(st.st_mtime_ns, st.st_ctime_ns) > _RACY_WINDOW_NS:
      self._entries[str(path)] = stamp + [digest]
      self._dirty = True
    elif self._entries.pop(str(path), None) is not None:
      self._dirty = True
    return digest

  def save(self) -> None:
    """Writes the index atomically if it changed (a concurrent writer's entries may be lost: only a re-hash)."""
    if self.path is None or not self._dirty:
      return
    with outputs.atomic_path(self.path) as tmp:
      tmp.write_text(json.dumps(self._entries, sort_keys=True))
    self._dirty = False


def cache_key(pair: Pair, label_settings: dict, *, digests: DigestIndex | None = None) -> str:
  """Hex key from the bytes of the image and label files, the stack page and the settings that shape the label."""
  digests = digests or DigestIndex(None)
  key = hashlib.sha256(_CACHE_VERSION.encode())
  key.update(digests.digest(pair.image_path).encode())
  if pair.label_path is not None:
    key.update(b"label" + digests.digest(pair.label_path).encode())
  page = getattr(pair, "page", None)
  if page is not None:
    key.update(f"page{page}".encode())
  key.update(repr(sorted(label_settings.items())).encode())
  return key.hexdigest()[:32]


def cached_entry(cache_dir: str | os.PathLike, key: str,
                 decode: Callable[[], tuple[np.ndarray, np.ndarray | None]], *, name: str, source_image: str,
                 source_label: str | None, source_page: int | None = None,
                 metadata: dict | None = None) -> PreparedImage:
  """The entry `key` of the cache, decoding and writing it first when it is missing.

  Args:
    cache_dir: the cache folder.
    key: the entry's content key (see `cache_key`).
    decode: returns (uint8 image [H, W], bool or uint8 membrane mask [H, W] or None); called only on a miss.
    name, source_image, source_label, source_page: recorded in the returned PreparedImage.
    metadata: JSON-able facts stored with a new entry (read back with `entry_metadata`).

  Returns:
    The entry as a PreparedImage.
  """
  cache_dir = pathlib.Path(cache_dir)
  entry = cache_dir / key
  if not (entry / IMAGE_FILE).is_file():
    image, mask = decode()
    arrays = {IMAGE_FILE: np.ascontiguousarray(image, np.uint8)}
    if mask is not None:
      if mask.shape != image.shape:
        raise sources.DataError(f"{source_image}: image is {image.shape} but its label {source_label} is "
                                f"{mask.shape}; an image and its label must have the same size.")
      arrays[LABEL_FILE] = np.ascontiguousarray(mask, np.uint8)
    _write_entry(entry, arrays, metadata)
  has_label = (entry / LABEL_FILE).is_file()
  if source_label is not None and not has_label:
    raise sources.DataError(f"cache entry {entry} has no {LABEL_FILE} although {source_label} was given; delete the "
                            "entry to rebuild it.")
  shape = np.load(entry / IMAGE_FILE, mmap_mode="r").shape
  return PreparedImage(name=name, image_path=str(entry / IMAGE_FILE),
                       label_path=str(entry / LABEL_FILE) if has_label else None, shape=(int(shape[0]), int(shape[1])),
                       source_image=source_image, source_label=source_label, source_page=source_page)


def entry_metadata(cache_dir: str | os.PathLike, key: str) -> dict | None:
  """The metadata stored with entry `key`, or None if the entry does not exist (or has none)."""
  entry = pathlib.Path(cache_dir) / key
  if not (entry / IMAGE_FILE).is_file() or not (entry / METADATA_FILE).is_file():
    return None
  return json.loads((entry / METADATA_FILE).read_text())


def _write_entry(entry: pathlib.Path, arrays: dict[str, np.ndarray], metadata: dict | None = None) -> None:
  """Writes the files of an entry into a hidden temporary folder, then renames the folder into place."""
  tmp = pathlib.Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}.", suffix=".tmp"))
  try:
    if metadata is not None:
      (tmp / METADATA_FILE).write_text(json.dumps(metadata, sort_keys=True))
    for filename, array in arrays.items():
      with open(tmp / filename, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())  # The data reaches the disk before the rename makes the entry visible.
    try:
      os.rename(tmp, entry)
    except OSError:
      if not (entry / IMAGE_FILE).is_file():
        raise
      shutil.rmtree(tmp, ignore_errors=True)  # Another process wrote the same entry first.
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def remove_stale_temporaries(cache_dir: str | os.PathLike, *, older_than_s: float = _STALE_TMP_SECONDS) -> int:
  """Deletes hidden temporary folders that crashed runs left in the cache; returns how many."""
  removed = 0
  now = time.time()
  for tmp in pathlib.Path(cache_dir).glob(".*.tmp"):
    try:
      if now - tmp.stat().st_mtime > older_than_s:
        shutil.rmtree(tmp, ignore_errors=True)
        removed += 1
    except FileNotFoundError:
      pass
  return removed


def _decode(pair: Pair, *, membrane: str, threshold: int | None):
  if isinstance(pair, sources.StackSlice):
    return sources.load_stack_slice(pair, membrane=membrane, threshold=threshold)
  if pair.label_path is None:
    return sources.read_image(pair.image_path), None
  return sources.load_pair(pair, membrane=membrane, threshold=threshold)


def prepare_pairs(
    pairs: Sequence[Pair],
    cache_dir: str | os.PathLike,
    *,
    membrane: str = "black",
    threshold: int | None = None,
    progress: bool = True,
) -> list[PreparedImage]:
  """Decodes every pair into the cache (reusing valid entries) and returns memory-mappable handles.

  Args:
    pairs: image/label file pairs (`sources.ImagePair`) or slices of TIFF stacks (`sources.StackSlice`).
    cache_dir: folder for the entries; created if missing.
    membrane: label polarity passed to `sources.load_pair` ("black" or "white").
    threshold: gray level at or below which a non-binary label counts as membrane (black polarity), or None.
    progress: show a progress bar.

  Returns:
    One PreparedImage per pair, in order.
  """
  cache_dir = pathlib.Path(cache_dir)
  cache_dir.mkdir(parents=True, exist_ok=True)
  remove_stale_temporaries(cache_dir)
  settings = {"membrane": membrane, "threshold": threshold}
  digests = DigestIndex(cache_dir / INDEX_FILE)
  prepared = []
  try:
    for pair in tqdm(pairs, desc="prepare", unit="image", disable=not progress or len(pairs) < 2):
      key = cache_key(pair, settings, digests=digests)
      prepared.append(cached_entry(
          cache_dir, key, lambda pair=pair: _decode(pair, membrane=membrane, threshold=threshold), name=pair.name,
          source_image=str(pair.image_path), source_label=None if pair.label_path is None else str(pair.label_path),
          source_page=getattr(pair, "page", None)))
      digests.save()
  finally:
    digests.save()
  return prepared
