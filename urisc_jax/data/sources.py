"""Image/label pairs from dataset folders, read with checks that name the file and the fix.

Four layouts are understood:
  - the U-RISC release: `imgs/<track>/<split>/<stem>.png` with `label/<track>/<split>/<stem>.tiff` (Track 2 may have
    no split folders: pass split=None, or the labels may lie directly in `label/Track2`);
  - ISBI 2012 as per-slice files: `<split>/images/NN.png` with `<split>/labels/NN.png` (the test split has none);
  - ISBI 2012 as released: multi-page TIFF stacks `train-volume.tif` with `train-labels.tif`, and `test-volume.tif`
    (`isbi_stack_pairs` gives one `StackSlice` per page);
  - any two folders of images and labels paired by file stem.
Labels mark membranes black (0) on white (255) in both datasets; `read_label` makes the polarity explicit and refuses a
label whose "membrane" class covers most of the image, the usual sign of an inverted polarity.
"""

import dataclasses
import pathlib
import re
from collections.abc import Sequence

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
    raise missing_folder(root, "U-RISC folder", "point the config at the unpacked release (the folder that holds "
                         "imgs/ and label/).")
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
    raise missing_folder(root, "ISBI 2012 folder", "point the config at the folder that holds train/images, "
                         "train/labels and test/images.")
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
    raise missing_folder(image_dir, "image folder", "point the config at a folder of images.")
  images = _by_stem(image_dir, IMAGE_SUFFIXES, "image")
  if not images:
    raise DataError(f"no images ({', '.join('*' + s for s in IMAGE_SUFFIXES)}) in {image_dir}; found: "
                    f"{_listing(image_dir)}.")
  if label_dir is None:
    return [ImagePair(stem, images[stem], None) for stem in sorted(images, key=_natural)]
  label_dir = pathlib.Path(label_dir)
  if not label_dir.is_dir():
    raise missing_folder(label_dir, "label folder", f"point the config at the labels for {image_dir}.")
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


def hidden_files(path) -> list[pathlib.Path]:
  """Files of a folder whose names start with "." and end like images: left out of `image_files` (they are mostly
  editor or macOS metadata, e.g. ._image.png), named here so that a caller can say so."""
  path = pathlib.Path(path)
  if not path.is_dir():
    return []
  return sorted(p for p in path.iterdir() if p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


def missing_folder(path: pathlib.Path, what: str, fix: str) -> DataError:
  """The error for a folder the data layout needs: `path` is a file, or does not exist. Returns it (to raise)."""
  if path.exists():
    return DataError(f"{what} {path} is a file, not a folder; {fix}")
  return MissingDataError(f"{what} {path} does not exist; {fix}")


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
  return _membrane_mask(imageio.read_gray(path), path, membrane=membrane, threshold=threshold,
                        max_membrane_fraction=max_membrane_fraction)


def _membrane_mask(gray: np.ndarray, path, *, membrane: str, threshold: int | None,
                   max_membrane_fraction: float) -> np.ndarray:
  """bool [H, W] membrane mask of a gray label read from `path` (named in errors); see `read_label`."""
  if membrane not in ("black", "white"):
    raise ValueError(f"membrane must be 'black' or 'white', got {membrane!r}")
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


def membrane_mask_of(gray: np.ndarray, what, *, membrane: str = "black", threshold: int | None = None) -> np.ndarray:
  """bool membrane mask of a gray label window (`what` names it in errors), decoded as label files are; no check of
  the membrane fraction (a window may lie all on membrane)."""
  return _membrane_mask(gray, what, membrane=membrane, threshold=threshold, max_membrane_fraction=1.0)


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


# ISBI 2012 as the challenge released it: multi-page TIFF stacks, one slice per page (train-volume.tif with
# train-labels.tif, and test-volume.tif).
ISBI_STACKS = {"train": ("train-volume.tif", "train-labels.tif"), "test": ("test-volume.tif", None)}


@dataclasses.dataclass(frozen=True)
class StackSlice:
  """Page `page` of an image stack and the same page of its label stack (label_path None when unlabelled)."""
  name: str
  image_path: pathlib.Path
  label_path: pathlib.Path | None
  page: int


def isbi_stack_pairs(root, *, split: str = "train", require_labels: bool | None = None) -> list[StackSlice]:
  """Slices of the ISBI 2012 stacks in `root` (train-volume.tif + train-labels.tif, test-volume.tif).

  Args:
    root: the folder holding the challenge's .tif stacks.
    split: "train" or "test".
    require_labels: whether a missing label stack is an error; None means yes except for the test split.

  Returns:
    One StackSlice per page, named "00", "01", ... like the per-slice layout read by `isbi_pairs`.
  """
  root = pathlib.Path(root)
  if split not in ISBI_STACKS:
    raise ValueError(f"split must be one of {sorted(ISBI_STACKS)}, got {split!r}")
  if not root.is_dir():
    raise MissingDataError(f"ISBI 2012 folder {root} does not exist; point the config at the folder that holds "
                           "train-volume.tif, train-labels.tif and test-volume.tif.")
  image_name, label_name = ISBI_STACKS[split]
  image_stack = root / image_name
  if not image_stack.is_file():
    raise MissingDataError(f"image stack {image_stack} does not exist. Found in {root}: {_listing(root)}.")
  if require_labels is None:
    require_labels = split != "test"
  label_stack = root / label_name if label_name else None
  if label_stack is None or not label_stack.is_file():
    if require_labels:
      raise MissingDataError(f"label stack {root / str(label_name)} does not exist (labels for {image_stack}). Found "
                             f"in {root}: {_listing(root)}. Pass require_labels=False to read images without labels.")
    label_stack = None
  return stack_pairs(image_stack, label_stack)


def stack_pairs(image_stack, label_stack=None) -> list[StackSlice]:
  """Pairs page i of a multi-page TIFF of images with page i of a stack of labels (or None).

  Args:
    image_stack: multi-page TIFF of 8-bit gray slices [D, H, W] (a single page counts as D = 1).
    label_stack: TIFF stack of labels with the same D, H and W, or None.

  Returns:
    One StackSlice per page, named by page number with at least two digits.
  """
  image_stack = pathlib.Path(image_stack)
  shape = stack_shape(image_stack)
  if label_stack is not None:
    label_stack = pathlib.Path(label_stack)
    label_shape = stack_shape(label_stack)
    if label_shape != shape:
      raise DataError(f"image stack {image_stack} holds {shape[0]} slices of {shape[1]} x {shape[2]} px but label "
                      f"stack {label_stack} holds {label_shape[0]} of {label_shape[1]} x {label_shape[2]}; a label "
                      "stack must match its image stack page for page. Use the labels made for this volume.")
  digits = max(2, len(str(shape[0] - 1)))
  return [StackSlice(f"{page:0{digits}d}", image_stack, label_stack, page) for page in range(shape[0])]


def stack_shape(path) -> tuple[int, int, int]:
  """(D, H, W) of a TIFF stack of 8-bit gray slices, from its header (no pixel data is read)."""
  with _open_stack(path) as tif:
    return _stack_layout(tif, path)[0]


def read_stack(path) -> np.ndarray:
  """Reads a TIFF stack of 8-bit gray slices (one per page, or one shaped page) as uint8 [D, H, W]."""
  with _open_stack(path) as tif:
    (depth, height, width), series = _stack_layout(tif, path)
    try:
      pages = [s.asarray() for s in series]
    except Exception as e:  # tifffile raises many types for corrupt data  # pylint: disable=broad-except
      raise DataError(f"cannot read the pixels of {path}: {e}. The file is corrupt or truncated; replace it with an "
                      "intact copy.") from None
  return np.ascontiguousarray(np.concatenate([p.reshape(-1, height, width) for p in pages])[:depth])


def read_stack_page(path, page: int) -> np.ndarray:
  """Reads slice `page` of a TIFF stack of 8-bit gray slices as uint8 [H, W], decoding only that page when the
  slices are stored one per page (the usual layout)."""
  with _open_stack(path) as tif:
    (depth, height, width), series = _stack_layout(tif, path)
    if not 0 <= page < depth:
      raise DataError(f"{path} holds {depth} slices (0-{depth - 1}); slice {page} does not exist.")
    try:
      if len(tif.pages) == depth:
        array = tif.pages[page].asarray()
        if array.shape == (height, width) and array.dtype == np.uint8:
          return array
      stack = [s.asarray() for s in series]
    except Exception as e:  # tifffile raises many types for corrupt data  # pylint: disable=broad-except
      raise DataError(f"cannot read the pixels of {path}: {e}. The file is corrupt or truncated; replace it with an "
                      "intact copy.") from None
  return np.ascontiguousarray(np.concatenate([p.reshape(-1, height, width) for p in stack])[page])


def load_stack_slice(pair: StackSlice, *, membrane: str = "black", threshold: int | None = None,
                     max_membrane_fraction: float = 0.5) -> tuple[np.ndarray, np.ndarray | None]:
  """Reads page `pair.page` of an image stack and of its label stack, like `load_pair` does for files.

  Returns:
    image: uint8 [H, W]; membrane: bool [H, W] (True on membrane), or None if the pair has no label.
  """
  image = read_stack_page(pair.image_path, pair.page)
  if pair.label_path is None:
    return image, None
  gray = read_stack_page(pair.label_path, pair.page)
  mask = _membrane_mask(gray, f"{pair.label_path} (page {pair.page})", membrane=membrane, threshold=threshold,
                        max_membrane_fraction=max_membrane_fraction)
  return image, mask


def isbi_slices(root, indices: Sequence[int], *, volume: str = "train",
                key: str = "slices") -> list[ImagePair | StackSlice]:
  """Slices of ISBI 2012 by index, from the TIFF stacks or the per-slice files in `root`.

  Slice k is page k of train-volume.tif (with train-labels.tif) when `root` holds the stacks, else the k-th file of
  train/images (with train/labels) in name order; volume "test" reads test-volume.tif or test/images, which have no
  labels. Both layouts name slice k "00", "01", ... alike.

  Args:
    root: the folder holding the stacks or the train/ and test/ folders.
    indices: the slices, in the order wanted.
    volume: "train" (labelled) or "test".
    key: the config key that selected the slices, named in errors.

  Returns:
    One pair (`ImagePair` or `StackSlice`) per index.
  """
  if volume not in ISBI_STACKS:
    raise ValueError(f"volume must be one of {sorted(ISBI_STACKS)}, got {volume!r}")
  if not indices:
    return []
  root = pathlib.Path(root)
  if (root / ISBI_STACKS[volume][0]).is_file():
    available = isbi_stack_pairs(root, split=volume)
  elif (root / volume / "images").is_dir():
    available = isbi_pairs(root, split=volume)
  elif not root.is_dir():
    raise missing_folder(root, "ISBI 2012 folder", f"point config.data.root at the folder that holds "
                         f"{ISBI_STACKS['train'][0]} or train/images.")
  else:
    raise MissingDataError(f"{root} holds neither {ISBI_STACKS[volume][0]} nor {volume}/images (needed by {key}). "
                           f"Found in {root}: {_listing(root)}.")
  beyond = [i for i in indices if not 0 <= i < len(available)]
  if beyond:
    raise ValueError(f"{key} names slice {max(beyond)}, but the {volume} volume in {root} holds {len(available)} "
                     f"slices (0-{len(available) - 1}).")
  return [available[i] for i in indices]


def _open_stack(path):
  import tifffile  # pylint: disable=g-import-not-at-top

  path = pathlib.Path(path)
  if not path.is_file():
    raise MissingDataError(f"TIFF stack {path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
  try:
    imageio.check_tiff_pages(path)  # a looping page chain would keep tifffile parsing forever
    imageio.check_tiff_tiles(path)
    tif = tifffile.TiffFile(path)
  except DataError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"cannot read {path} as a TIFF stack: {e}. The file is corrupt, truncated or not a TIFF; replace "
                    "it with an intact copy.") from None
  for series in tif.series:  # each slice under the pixel cap, before any is decoded
    if len(series.shape) >= 2:
      imageio.check_pixels(path, int(series.shape[-1]), int(series.shape[-2]), what="slice")
  return tif


def _stack_layout(tif, path) -> tuple[tuple[int, int, int], list]:
  """((D, H, W), series) of an open TIFF: one shaped series [D, H, W] or [H, W], or one 2-D series per page."""
  series = list(tif.series)
  shapes = [tuple(int(n) for n in s.shape) for s in series]
  dtypes = {str(s.dtype) for s in series}
  if not series:
    raise DataError(f"{path} holds no images; expected a stack of 8-bit gray slices.")
  if dtypes != {"uint8"}:
    raise DataError(f"{path} holds {', '.join(sorted(dtypes))} pixels; this project reads 8-bit gray only. Convert "
                    "the stack to uint8.")
  if len(series) == 1 and len(shapes[0]) in (2, 3):
    shape = shapes[0] if len(shapes[0]) == 3 else (1, *shapes[0])
  elif all(len(s) == 2 for s in shapes) and len(set(shapes)) == 1:
    shape = (len(series), *shapes[0])
  else:
    raise DataError(f"{path} holds images of shapes {shapes[:4]}; expected a stack of 2-D gray slices of one size "
                    "(pages [H, W], or one [D, H, W] array). Save each slice as one gray page.")
  return shape, series


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
