"""Image/label pairs from dataset folders, read with checks that name the file and the fix.

Three layouts are understood:
  - the U-RISC release: `imgs/<track>/<split>/<stem>.png` with `label/<track>/<split>/<stem>.tiff` (Track 2 may have
    no split folders: pass split=None, or the labels may lie directly in `label/Track2`);
  - ISBI 2012 as per-slice files: `<split>/images/NN.png` with `<split>/labels/NN.png` (the test split has none);
  - any two folders of images and labels paired by file stem.
Labels mark membranes black (0) on white (255) in both datasets; `read_label` makes the polarity explicit and refuses a
label whose "membrane" class covers most of the image, the usual sign of an inverted polarity.
"""

import dataclasses
import pathlib
import re

import numpy as np

from urisc_jax.data import imageio
from urisc_jax.data.imageio import DataError, MissingDataError  # pylint: disable=unused-import

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
LABEL_SUFFIXES = (".tiff", ".tif", ".png")
# Gray level competitors used to re-binarize the interpolated U-RISC Track 2 labels (membrane = gray <= 122).
TRACK2_THRESHOLD = 122


@dataclasses.dataclass(frozen=True)
class ImagePair:
  """One image and its membrane label (None where the split has no labels, e.g. a test split)."""
  name: str
  image_path: pathlib.Path
  label_path: pathlib.Path | None


def urisc_pairs(root, *, track: str = "Track1", split: str | None = "train",
                require_labels: bool = True) -> list[ImagePair]:
  """Pairs of a U-RISC release folder.

  Args:
    root: the folder holding `imgs/` and `label/`.
    track: "Track1" or "Track2" (any folder name under imgs/).
    split: "train", "val", "test", or None where the images lie directly in imgs/<track>.
    require_labels: if False, a missing label folder gives pairs with label_path None (e.g. an unlabelled test split).

  Returns:
    Pairs sorted by name.
  """
  root = pathlib.Path(root)
  if not root.is_dir():
    raise MissingDataError(f"U-RISC folder {root} does not exist; point the config at the unpacked release (the "
                           "folder that holds imgs/ and label/).")
  images_root = root / "imgs"
  if not images_root.is_dir():
    raise MissingDataError(f"{images_root} does not exist; a U-RISC release holds imgs/<track>/<split>/*.png and "
                           f"label/<track>/<split>/*.tiff. Found in {root}: {_listing(root)}.")
  track_dir = images_root / track
  if not track_dir.is_dir():
    raise MissingDataError(f"track folder {track_dir} does not exist. Tracks found in {images_root}: "
                           f"{_listing(images_root, dirs_only=True)}.")
  image_dir = _split_dir(track_dir, split)
  label_track = root / "label" / track
  label_dir = label_track if split is None else label_track / split
  if not label_dir.is_dir() and split is not None and _files(label_track, LABEL_SUFFIXES):
    label_dir = label_track  # labels of all splits side by side (seen for Track 2)
  if not label_dir.is_dir():
    if require_labels:
      raise MissingDataError(f"label folder {label_dir} does not exist (labels for {image_dir}). Found in "
                             f"{label_dir.parent}: {_listing(label_dir.parent, dirs_only=True)}. Pass "
                             "require_labels=False to read images without labels.")
    label_dir = None
  return folder_pairs(image_dir, label_dir, all_labels_used=label_dir != label_track or split is None)


def isbi_pairs(root, *, split: str = "train", require_labels: bool | None = None) -> list[ImagePair]:
  """Pairs of ISBI 2012 slices stored as `<split>/images/NN.png` and `<split>/labels/NN.png`.

  Args:
    root: the folder holding train/ and test/.
    split: "train" or "test".
    require_labels: whether a missing labels folder is an error; None means yes except for the test split, whose
      labels were never released.
  """
  root = pathlib.Path(root)
  if not root.is_dir():
    raise MissingDataError(f"ISBI 2012 folder {root} does not exist; point the config at the folder that holds "
                           "train/images, train/labels and test/images.")
  split_dir = root / split
  if not split_dir.is_dir():
    raise MissingDataError(f"split folder {split_dir} does not exist. Found in {root}: "
                           f"{_listing(root, dirs_only=True)}.")
  if require_labels is None:
    require_labels = split != "test"
  label_dir = split_dir / "labels"
  if not label_dir.is_dir():
    if require_labels:
      raise MissingDataError(f"label folder {label_dir} does not exist. Found in {split_dir}: "
                             f"{_listing(split_dir)}. Pass require_labels=False to read images without labels.")
    label_dir = None
  return folder_pairs(split_dir / "images", label_dir)


def folder_pairs(image_dir, label_dir=None, *, all_labels_used: bool = True) -> list[ImagePair]:
  """Pairs images and labels by file stem (`a.png` with `a.tiff`, `a.tif` or `a.png`).

  Args:
    image_dir: folder of images (*.png, *.tif, *.tiff, *.jpg, *.jpeg, *.bmp).
    label_dir: folder of labels, or None for images without labels.
    all_labels_used: whether a label without an image is an error.

  Returns:
    Pairs sorted by name (numbers in names compare as numbers).
  """
  image_dir = pathlib.Path(image_dir)
  if not image_dir.is_dir():
    raise MissingDataError(f"image folder {image_dir} does not exist.")
  images = _by_stem(image_dir, IMAGE_SUFFIXES, "image")
  if not images:
    raise DataError(f"no images ({', '.join('*' + s for s in IMAGE_SUFFIXES)}) in {image_dir}; found: "
                    f"{_listing(image_dir)}.")
  if label_dir is None:
    return [ImagePair(stem, images[stem], None) for stem in sorted(images, key=_natural)]
  label_dir = pathlib.Path(label_dir)
  if not label_dir.is_dir():
    raise MissingDataError(f"label folder {label_dir} does not exist (labels for {image_dir}).")
  labels = _by_stem(label_dir, LABEL_SUFFIXES, "label")
  missing = sorted(set(images) - set(labels), key=_natural)
  if missing:
    stem = missing[0]
    expected = " or ".join(str(label_dir / (stem + s)) for s in LABEL_SUFFIXES)
    more = f" ({len(missing) - 1} more images lack labels: {', '.join(missing[1:6])}...)" if len(missing) > 1 else ""
    raise DataError(f"image {images[stem]} has no label: expected {expected}{more}. Add the label, or move the image "
                    "out of the folder.")
  orphans = sorted(set(labels) - set(images), key=_natural) if all_labels_used else []
  if orphans:
    stem = orphans[0]
    more = f" ({len(orphans) - 1} more)" if len(orphans) > 1 else ""
    raise DataError(f"label {labels[stem]} has no image: expected {image_dir / (stem + '.png')}{more}. Remove the "
                    "label or add the image.")
  return [ImagePair(stem, images[stem], labels[stem]) for stem in sorted(images, key=_natural)]


def image_files(path) -> list[pathlib.Path]:
  """The image files named by `path`: the file itself, or a folder's images sorted by name.

  Args:
    path: an image file, or a folder of images (*.png, *.tif, *.tiff, *.jpg, *.jpeg, *.bmp; not recursive).
  """
  path = pathlib.Path(path)
  if path.is_file():
    return [path]
  if not path.is_dir():
    raise MissingDataError(f"{path} does not exist; pass an image file or a folder of images.")
  files = sorted(_by_stem(path, IMAGE_SUFFIXES, "image").values(), key=lambda p: _natural(p.name))
  if not files:
    raise DataError(f"no images ({', '.join('*' + s for s in IMAGE_SUFFIXES)}) in {path}; found: {_listing(path)}.")
  return files


def read_image(path) -> np.ndarray:
  """Reads an 8-bit gray EM image (1 channel, or RGB with equal channels) as uint8 [H, W]."""
  return imageio.read_gray(path)


def read_label(path, *, membrane: str = "black", threshold: int | None = None,
               max_membrane_fraction: float = 0.5) -> np.ndarray:
  """Reads a membrane label as a boolean mask.

  Args:
    path: label image (8-bit gray).
    membrane: "black" if membranes are dark (U-RISC and ISBI: 0 = membrane), "white" if they are bright.
    threshold: None for binary labels (only 0 and 255); otherwise gray <= threshold is dark, gray > threshold bright
      (U-RISC Track 2 labels are interpolated: threshold=122).
    max_membrane_fraction: above this share of membrane pixels the polarity is taken to be inverted (membranes are a
      minority class in EM: ~5 % in U-RISC, ~22 % in ISBI 2012).

  Returns:
    bool [H, W], True on membrane.
  """
  if membrane not in ("black", "white"):
    raise ValueError(f"membrane must be 'black' or 'white', got {membrane!r}")
  gray = imageio.read_gray(path)
  if threshold is None:
    counts = np.bincount(gray.ravel(), minlength=256)
    other = np.flatnonzero(counts[1:255]) + 1
    if other.size:
      examples = ", ".join(str(v) for v in other[:5])
      raise DataError(f"label {path} is not binary: besides 0 and 255 it holds {other.size} gray levels (e.g. "
                      f"{examples}). Pass threshold={TRACK2_THRESHOLD} to binarize it (membrane = gray <= "
                      f"{TRACK2_THRESHOLD}, as used for U-RISC Track 2).")
    mask = gray == 0 if membrane == "black" else gray == 255
  else:
    if not 0 <= threshold < 255:
      raise ValueError(f"threshold must be in [0, 254], got {threshold}")
    dark = gray <= threshold
    mask = dark if membrane == "black" else ~dark
  fraction = float(mask.mean())
  if fraction > max_membrane_fraction:
    other_polarity = "white" if membrane == "black" else "black"
    raise DataError(f"label {path}: the membrane class (membrane={membrane!r}) covers {100 * fraction:.1f} % of the "
                    f"image, but membranes are a minority class in EM (U-RISC ~5 %, ISBI 2012 ~22 %), so the polarity "
                    f"is probably inverted. Pass membrane={other_polarity!r} if membranes are {other_polarity} in "
                    f"these labels (or raise max_membrane_fraction if this label really is mostly membrane).")
  return mask


def load_pair(pair: ImagePair, *, membrane: str = "black", threshold: int | None = None,
              max_membrane_fraction: float = 0.5) -> tuple[np.ndarray, np.ndarray | None]:
  """Reads an image and its label, checking that they have the same size.

  Returns:
    image: uint8 [H, W]; membrane: bool [H, W] (True on membrane), or None if the pair has no label.
  """
  image = read_image(pair.image_path)
  if pair.label_path is None:
    return image, None
  mask = read_label(pair.label_path, membrane=membrane, threshold=threshold,
                    max_membrane_fraction=max_membrane_fraction)
  if mask.shape != image.shape:
    hint = " (transposed?)" if mask.shape == image.shape[::-1] else ""
    raise DataError(f"image {pair.image_path} is {image.shape[0]} x {image.shape[1]} (rows x columns) but its label "
                    f"{pair.label_path} is {mask.shape[0]} x {mask.shape[1]}{hint}; an image and its label must have "
                    "the same size. Replace the label with the one made for this image.")
  return image, mask


def _split_dir(track_dir: pathlib.Path, split: str | None) -> pathlib.Path:
  if split is None:
    if not _files(track_dir, IMAGE_SUFFIXES):
      raise MissingDataError(f"no images directly in {track_dir}; pass split= one of "
                             f"{_listing(track_dir, dirs_only=True)}.")
    return track_dir
  split_dir = track_dir / split
  if split_dir.is_dir():
    return split_dir
  if _files(track_dir, IMAGE_SUFFIXES):
    raise MissingDataError(f"split folder {split_dir} does not exist: the images of {track_dir} lie directly in it "
                           "(no split folders); pass split=None.")
  raise MissingDataError(f"split folder {split_dir} does not exist. Splits found in {track_dir}: "
                         f"{_listing(track_dir, dirs_only=True)}.")


def _files(folder: pathlib.Path, suffixes) -> list[pathlib.Path]:
  if not folder.is_dir():
    return []
  return [p for p in folder.iterdir()
          if p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith(".")]


def _by_stem(folder: pathlib.Path, suffixes, what: str) -> dict[str, pathlib.Path]:
  found = {}
  for path in _files(folder, suffixes):
    if path.stem in found:
      raise DataError(f"two {what} files share the name {path.stem!r}: {found[path.stem]} and {path}; keep one.")
    found[path.stem] = path
  return found


def _natural(name: str):
  return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _listing(folder: pathlib.Path, *, dirs_only: bool = False, limit: int = 12) -> str:
  if not folder.is_dir():
    return "(folder missing)"
  names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir()
                 if (p.is_dir() or not dirs_only) and not p.name.startswith("."))
  if not names:
    return "nothing"
  return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")
