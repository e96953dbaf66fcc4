"""The official U-RISC F1 scorer, and the small functions every report needs.

The U-RISC benchmark scores a binary membrane map against a ground-truth membrane map with a pixel F1 whose exact
rules matter for comparing numbers with the paper and the competition:

* Both images are read as 8-bit gray (black = membrane, white = background) and inverted, `255 - x`, so that
  membrane pixels carry a positive weight.
* P = sum(pred * [gt != 0]) / sum(pred) and R = sum(gt * [pred != 0]) / sum(gt); F = 2PR / (P + R), 0 when P + R
  is 0. Empty prediction with non-empty ground truth: P = 1, R = 0. Non-empty prediction with empty ground truth:
  P = 0, R = 1. Both empty: P = R = 1.
* The official scorer does NOT binarize the ground truth (`gt_mode="official"`): gray levels weigh the recall and
  any ground-truth pixel that is not pure white counts as membrane in the precision. The competition binarized the
  ground truth at membrane = gray <= 122 (`gt_mode="binarized"`).
* A prediction is rejected unless it is a binary 0/255 image with at least 5 background pixels per membrane pixel
  (the official check that catches inverted polarity).

All sums are exact integer sums; the ratios are float64, so the scores match the reference values to ~1e-15.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from scipy import ndimage

GT_MODES = ("official", "binarized")
# Competitors re-binarized the (bilinearly resized) Track-2 labels with membrane = gray <= 122.
BINARIZE_LEVEL = 122
# The official check: a prediction needs at least this many background pixels per membrane pixel.
MIN_BACKGROUND_PER_MEMBRANE = 5
IMAGE_SUFFIXES = (".png", ".tif", ".tiff")


class SubmissionFormatError(ValueError):
  """A prediction or ground-truth array breaks the format the official scorer accepts."""


class ImageReadError(ValueError):
  """An image file exists but cannot be read as one 8-bit gray image."""


class PairingError(ValueError):
  """Prediction and ground-truth folders do not hold the same image names."""


def _describe_values(values: np.ndarray, limit: int = 8) -> str:
  shown = ", ".join(str(int(v)) for v in values[:limit])
  return "{" + shown + (", ..." if len(values) > limit else "") + "}"


def to_gray8(image: np.ndarray, *, name: str = "image") -> np.ndarray:
  """Returns an 8-bit gray image [H, W] from a gray or equal-channel color array.

  Args:
    image: uint8 array [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] (alpha ignored). Color images must have
      R = G = B, for which every luminance formula gives back the common value, as an 8-bit gray read would.
    name: what to call the array in error messages (e.g. a file name).

  Returns:
    uint8 array [H, W].
  """
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise SubmissionFormatError(_dtype_message(name, image.dtype))
  if image.ndim == 3 and image.shape[-1] in (1, 3, 4):
    channels = image[..., :3] if image.shape[-1] == 4 else image
    gray = channels[..., 0]
    if channels.shape[-1] == 3 and not (np.array_equal(gray, channels[..., 1])
                                        and np.array_equal(gray, channels[..., 2])):
      raise SubmissionFormatError(
          f"{name}: color image with unequal R, G, B channels; membrane maps must be gray (R = G = B).")
    image = gray
  if image.ndim != 2:
    raise SubmissionFormatError(_shape_message(name, image.shape))
  return np.ascontiguousarray(image)


def _dtype_message(name: str, dtype) -> str:
  return (f"{name}: expected 8-bit (uint8) values 0..255, got dtype {dtype}; save membrane maps as 8-bit gray images "
          "(black = membrane, white = background).")


def _shape_message(name: str, shape: tuple[int, ...]) -> str:
  return f"{name}: expected a 2-D gray image [H, W] (or [H, W, 3] with equal channels), got shape {shape}."


def check_prediction_format(pred: np.ndarray, *, name: str = "prediction") -> None:
  """Raises SubmissionFormatError unless `pred` is a submission the official scorer accepts.

  Args:
    pred: uint8 [H, W] as read from disk: 0 (black) = membrane, 255 (white) = background.
    name: what to call the array in error messages.
  """
  values = np.unique(pred)
  if len(values) > 2:
    raise SubmissionFormatError(
        f"{name}: has {len(values)} gray values {_describe_values(values)}; the scorer needs a binary image: "
        "threshold the membrane probability first (membrane = 0, background = 255).")
  if not set(values.tolist()) <= {0, 255}:
    # The official scorer counts only 0 and 255 in its checks, so other levels (e.g. a 0/1 mask) break it.
    raise SubmissionFormatError(
        f"{name}: gray values {_describe_values(values)} are not 0 and 255; save membrane as 0 (black) and "
        "background as 255 (white), e.g. `np.where(mask, 0, 255).astype(np.uint8)`.")
  membrane = int(np.count_nonzero(pred == 0))
  background = pred.size - membrane
  if membrane and background < MIN_BACKGROUND_PER_MEMBRANE * membrane:
    raise SubmissionFormatError(
        f"{name}: {background} background pixels for {membrane} membrane pixels (ratio "
        f"{background / membrane:.3f} < {MIN_BACKGROUND_PER_MEMBRANE}); submissions must show black membranes on a "
        "white background: is the polarity inverted?")


def _ground_truth_weights(gt: np.ndarray, gt_mode: str) -> np.ndarray:
  """Membrane weights of the ground truth, uint8 [H, W]: 255 - gray, or 255 where gray <= 122."""
  if gt_mode == "official":
    return 255 - gt
  if gt_mode == "binarized":
    return np.where(gt <= BINARIZE_LEVEL, np.uint8(255), np.uint8(0))
  raise ValueError(f"gt_mode must be one of {GT_MODES}, got {gt_mode!r}")


def _disk(radius: int) -> np.ndarray:
  """Euclidean disk footprint, bool [2r+1, 2r+1]: offsets with dy^2 + dx^2 <= r^2."""
  offsets = np.arange(-radius, radius + 1)
  return offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius * radius


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
  if radius == 0:
    return mask
  return ndimage.binary_dilation(mask, structure=_disk(radius))


def precision_recall_f1(matched_pred: int, total_pred: int, matched_gt: int,
                        total_gt: int) -> tuple[float, float, float]:
  """F1, precision and recall from (weighted) match counts, with the official scorer's empty cases.

  Args:
    matched_pred: weight of predicted membrane that falls on ground-truth membrane.
    total_pred: total predicted membrane weight.
    matched_gt: weight of ground-truth membrane covered by predicted membrane.
    total_gt: total ground-truth membrane weight.

  Returns:
    (f1, precision, recall) as Python floats.
  """
  if total_pred == 0 and total_gt > 0:
    precision, recall = 1.0, 0.0
  elif total_pred > 0 and total_gt == 0:
    precision, recall = 0.0, 1.0
  elif total_pred == 0 and total_gt == 0:
    precision, recall = 1.0, 1.0
  else:
    precision, recall = matched_pred / total_pred, matched_gt / total_gt
  f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
  return float(f1), float(precision), float(recall)


def official_f1(pred: np.ndarray, gt: np.ndarray, *, gt_mode: str = "official",
                bound_pix: int = 0) -> tuple[float, float, float]:
  """Scores one binary membrane map against ground truth the way the official U-RISC scorer does.

  Args:
    pred: prediction as read from disk, uint8 [H, W] (or [H, W, 3] with R = G = B): 0 = membrane, 255 = background.
      Must pass `check_prediction_format`.
    gt: ground truth as read from disk, uint8 [H, W] (or equal-channel [H, W, 3]); black = membrane. Need not be
      binary.
    gt_mode: "official" weighs the recall by the inverted gray level and counts any non-white pixel as membrane in
      the precision (the published scorer); "binarized" uses membrane = gray <= 122 (the competition).
    bound_pix: boundary tolerance in pixels. 0 (the official setting) is an exact pixel match. With r > 0 a
      predicted membrane pixel counts as correct when a ground-truth membrane pixel lies within the Euclidean disk
      dy^2 + dx^2 <= r^2, and a ground-truth pixel counts as found when a predicted membrane pixel lies within it.

  Returns:
    (f1, precision, recall) as floats.
  """
  pred = to_gray8(pred, name="prediction")
  gt = to_gray8(gt, name="ground truth")
  if pred.shape != gt.shape:
    raise SubmissionFormatError(
        f"prediction shape {pred.shape} differs from ground-truth shape {gt.shape}; predict at the ground truth's "
        "full resolution.")
  if gt_mode not in GT_MODES:
    raise ValueError(f"gt_mode must be one of {GT_MODES}, got {gt_mode!r}")
  if int(bound_pix) != bound_pix or bound_pix < 0:
    raise ValueError(f"bound_pix must be a non-negative integer, got {bound_pix!r}")
  bound_pix = int(bound_pix)
  check_prediction_format(pred)

  pred_membrane = pred == 0
  gt_weight = _ground_truth_weights(gt, gt_mode)
  gt_membrane = gt_weight != 0
  # The inverted prediction weighs every membrane pixel 255; the weight cancels in P, so counts suffice.
  total_pred = int(np.count_nonzero(pred_membrane))
  matched_pred = int(np.count_nonzero(pred_membrane & _dilate(gt_membrane, bound_pix)))
  total_gt = int(gt_weight.sum(dtype=np.int64))
  matched_gt = int(gt_weight[_dilate(pred_membrane, bound_pix)].sum(dtype=np.int64))
  return precision_recall_f1(matched_pred, total_pred, matched_gt, total_gt)


def pixel_error(pred_membrane: np.ndarray, gt_membrane: np.ndarray) -> float:
  """Fraction of pixels whose membrane / background class differs (the classic ISBI 2012 pixel error).

  Args:
    pred_membrane: bool [H, W], True on predicted membrane.
    gt_membrane: bool [H, W], True on ground-truth membrane.

  Returns:
    Mismatched pixels / all pixels, in [0, 1].
  """
  pred_membrane = np.asarray(pred_membrane, dtype=bool)
  gt_membrane = np.asarray(gt_membrane, dtype=bool)
  if pred_membrane.shape != gt_membrane.shape:
    raise ValueError(f"shapes differ: prediction {pred_membrane.shape} vs ground truth {gt_membrane.shape}")
  if pred_membrane.size == 0:
    raise ValueError("pixel_error of empty arrays is undefined")
  return float(np.count_nonzero(pred_membrane != gt_membrane) / pred_membrane.size)


def mean_and_sem(values: Iterable[float]) -> tuple[float, float]:
  """Mean and standard error of the mean, std(ddof=1) / sqrt(n), as the paper reports mean +- s.e.

  Returns (mean, nan) for a single value, where the spread is unknown.
  """
  values = np.asarray(list(values), dtype=np.float64)
  if values.size == 0:
    raise ValueError("mean_and_sem needs at least one value")
  mean = float(values.mean())
  if values.size == 1:
    return mean, math.nan
  return mean, float(values.std(ddof=1) / math.sqrt(values.size))


def _read_with_pil(path: pathlib.Path, max_pixels: int | None) -> np.ndarray:
  from urisc_jax.data import imageio  # pylint: disable=g-import-not-at-top

  with imageio.open_image(path, max_pixels=max_pixels) as img:
    img.load()
    mode = img.mode
    if mode in ("1", "L"):
      return np.asarray(img.convert("L"))
    if mode == "LA":
      return np.asarray(img)[..., 0]
    if mode in ("P", "PA"):
      return np.asarray(img.convert("RGB"))
    if mode in ("RGB", "RGBA", "RGBX"):
      return np.asarray(img)
    raise ImageReadError(
        f"{path}: PIL mode {mode!r} is not an 8-bit gray or RGB image (16-bit / float images are not accepted); "
        "save it as 8-bit gray (0 = membrane, 255 = background).")


def _squeezed_shape(shape: tuple[int, ...]) -> tuple[tuple[int, ...], bool]:
  """The shape a TIFF array takes once leading singleton axes (one-page stacks) are dropped, and whether it is
  planar RGB [3 or 4, H, W]; a real stack stays 3-D and is refused."""
  shape = tuple(int(n) for n in shape)
  while len(shape) > 2 and shape[0] == 1:
    shape = shape[1:]
  planar = len(shape) == 3 and shape[0] in (3, 4) and shape[-1] not in (3, 4)
  return shape, planar


def _read_with_tifffile(path: pathlib.Path, max_pixels: int | None) -> np.ndarray:
  import tifffile  # pylint: disable=g-import-not-at-top

  from urisc_jax.data import imageio  # pylint: disable=g-import-not-at-top

  imageio.check_tiff_pages(path)  # before tifffile follows a looping chain of pages forever
  with tifffile.TiffFile(path) as tif:
    if not tif.series:
      raise ImageReadError(f"{path}: a TIFF without pages holds no image; is the file complete?")
    # tifffile allocates the first series' shape before decoding: refuse what to_gray8 would, and a bomb, first.
    series = tif.series[0]
    shape, planar = _squeezed_shape(series.shape)
    if series.dtype == bool:
      raise ImageReadError(f"{path}: 1-bit TIFF; save it as 8-bit gray (0 = membrane, 255 = background).")
    if series.dtype != np.uint8:
      raise ImageReadError(_dtype_message(str(path), series.dtype))
    gray_shape = (*shape[1:], shape[0]) if planar else shape
    if not (len(gray_shape) == 2 or (len(gray_shape) == 3 and gray_shape[-1] in (1, 3, 4))):
      raise ImageReadError(_shape_message(str(path), gray_shape))
    imageio.check_pixels(path, gray_shape[1], gray_shape[0], max_pixels=max_pixels)
    imageio.check_tiff_tiles(path, max_pixels=max_pixels)
    image = tif.asarray()  # what tifffile.imread reads: the first series
  image = image.reshape(shape)
  return np.moveaxis(image, 0, -1) if planar else image


def read_gray8(path: str | pathlib.Path, *, max_pixels: int | None = None) -> np.ndarray:
  """Reads a PNG or TIFF membrane map as 8-bit gray, uint8 [H, W].

  RGB(A) files with R = G = B (the U-RISC release stores 3-channel gray PNGs) become their common channel; the
  alpha channel is ignored. Missing, corrupt, non-8-bit, multi-page or truly colored files raise one clear error
  naming the file, and so does a header that declares more pixels than the project's cap (a decompression bomb),
  before anything is decoded.

  Args:
    path: the image file. TIFFs (by suffix and content) are read with tifffile, everything else with Pillow.
    max_pixels: this read's pixel cap; None uses the process-wide one (urisc_jax.data.imageio.set_max_pixels,
      config.data.max_image_pixels).

  Raises:
    FileNotFoundError: the file does not exist (or is a folder).
    ImageReadError: any other reason the file is not one 8-bit gray image; the message names the file.
  """
  from urisc_jax.data import imageio  # pylint: disable=g-import-not-at-top

  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such image file" + (" (it is a folder)" if path.is_dir() else ""))
  try:
    # A PNG named .tif goes to Pillow, which identifies files by content.
    if path.suffix.lower() in (".tif", ".tiff") and imageio.is_tiff(path):
      try:
        image = _read_with_tifffile(path, max_pixels)
      except ImportError:
        image = _read_with_pil(path, max_pixels)
    else:
      image = _read_with_pil(path, max_pixels)
  except (ImageReadError, FileNotFoundError):
    raise
  except imageio.DataError as e:  # the pixel cap, or an empty image; its message names the file and the fix
    raise ImageReadError(str(e)) from e
  except Exception as e:  # PIL / tifffile raise many types for damaged files.
    raise ImageReadError(f"{path}: cannot be read as an image ({type(e).__name__}: {e}); is the file complete?") \
        from e
  if image.dtype == bool:
    raise ImageReadError(f"{path}: 1-bit TIFF; save it as 8-bit gray (0 = membrane, 255 = background).")
  try:
    return to_gray8(image, name=str(path))
  except SubmissionFormatError as e:
    raise ImageReadError(str(e)) from e


def list_images(folder: str | pathlib.Path) -> dict[str, pathlib.Path]:
  """Image files (.png / .tif / .tiff, any case) of a folder, by file stem."""
  folder = pathlib.Path(folder)
  if folder.exists() and not folder.is_dir():
    raise NotADirectoryError(f"{folder} is a file, not a folder; pass the folder that holds the images.")
  if not folder.is_dir():
    raise FileNotFoundError(f"{folder}: no such folder")
  by_stem: dict[str, pathlib.Path] = {}
  for path in sorted(folder.iterdir()):
    if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
      continue
    if path.stem in by_stem:
      raise PairingError(f"{folder}: two images share the name {path.stem!r} ({by_stem[path.stem].name}, "
                         f"{path.name}); keep one per name.")
    by_stem[path.stem] = path
  return by_stem


def pair_images(pred_dir: str | pathlib.Path,
                gt_dir: str | pathlib.Path) -> list[tuple[str, pathlib.Path, pathlib.Path]]:
  """Pairs prediction and ground-truth files by stem: [(stem, pred_path, gt_path)] sorted by stem."""
  preds, gts = list_images(pred_dir), list_images(gt_dir)
  missing_gt = sorted(set(preds) - set(gts))
  missing_pred = sorted(set(gts) - set(preds))
  if missing_gt or missing_pred:
    lines = []
    if missing_pred:
      lines.append(f"ground truth without prediction in {pred_dir}: {', '.join(missing_pred)}")
    if missing_gt:
      lines.append(f"prediction without ground truth in {gt_dir}: {', '.join(missing_gt)}")
    raise PairingError("images are paired by file name (stem), but " + "; ".join(lines))
  if not preds:
    raise PairingError(f"no .png/.tif/.tiff images in {pred_dir} and {gt_dir}")
  return [(stem, preds[stem], gts[stem]) for stem in sorted(preds)]


def summarize(per_image: list[Mapping[str, Any]]) -> dict[str, Any]:
  """Dataset summary of per-image rows with f1 / precision / recall: plain means and s.e. of F."""
  mean_f1, sem_f1 = mean_and_sem(row["f1"] for row in per_image)
  return {
      "num_images": len(per_image),
      "mean_f1": mean_f1,
      "sem_f1": sem_f1,
      "mean_precision": float(np.mean([row["precision"] for row in per_image])),
      "mean_recall": float(np.mean([row["recall"] for row in per_image])),
  }


def score_folders(pred_dir: str | pathlib.Path, gt_dir: str | pathlib.Path, *, gt_mode: str = "official",
                  bound_pix: int = 0, strict: bool = True) -> dict[str, Any]:
  """Scores every prediction in `pred_dir` against the ground truth of the same name in `gt_dir`.

  Args:
    pred_dir: folder of binary predictions (.png/.tif/.tiff; 0 = membrane, 255 = background).
    gt_dir: folder of ground-truth membrane maps with the same file stems.
    gt_mode: "official" or "binarized", see `official_f1`.
    bound_pix: boundary tolerance, see `official_f1`.
    strict: raise at the first prediction the official format check rejects (naming the file); with False it
      scores 0 (F1, precision and recall), as a rejected submission does, and its row says why under "rejected".

  Returns:
    {"images": [{"name", "prediction", "ground_truth", "f1", "precision", "recall"[, "rejected"]}, ...] sorted by
     name, "num_images", "num_rejected", "mean_f1" (the dataset score: plain mean of per-image F), "sem_f1",
     "mean_precision", "mean_recall", "gt_mode", "bound_pix"}.
  """
  rows = []
  for stem, pred_path, gt_path in pair_images(pred_dir, gt_dir):
    pred, gt = read_gray8(pred_path), read_gray8(gt_path)
    row = {"name": stem, "prediction": str(pred_path), "ground_truth": str(gt_path)}
    try:
      f1, precision, recall = official_f1(pred, gt, gt_mode=gt_mode, bound_pix=bound_pix)
      row.update(f1=f1, precision=precision, recall=recall)
    except SubmissionFormatError as e:
      if strict:
        raise SubmissionFormatError(f"{pred_path} (ground truth {gt_path}): {e}") from e
      row.update(f1=0.0, precision=0.0, recall=0.0, rejected=str(e))
    rows.append(row)
  return {"images": rows, **summarize(rows), "num_rejected": sum("rejected" in row for row in rows),
          # What the scorer saw: the ground truth as read ("official") or binarized ("binarized@122").
          "gt_mode": "official" if gt_mode == "official" else f"binarized@{BINARIZE_LEVEL}", "bound_pix": int(bound_pix)}
