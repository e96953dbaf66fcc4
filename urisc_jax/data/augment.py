"""Augmentations applied identically to an image crop and its label, driven by the example's numpy Generator.

The paper's eight augmentations (horizontal / vertical flip, rotation, zoom, random crop, translation, contrast,
color (intensity) jitter) plus the random noise-shape cutout some U-RISC competitors used:
  - Geometry is one affine map from crop pixels to source pixels: rotation by any angle, zoom, crop-and-resize of a
    sub-window and translation. It is sampled from a window of the full image around the crop (so rotating or
    zooming out shows image, not padding): the image bilinearly, the label by nearest neighbour, with the same map.
    Flips and right-angle rotations are exact: array operations on an unwarped crop, folded into a warp's map.
  - Contrast (about the crop's mean), brightness and gamma ("color jitter" of a gray image) are one 256-entry lookup
    table on the image.
  - Cutout replaces blobs (a thresholded smooth random field) with noise of the crop's mean and spread.
Labels only follow the geometry. Every parameter is drawn for every example whether or not its augmentation is on,
so switching one off leaves the others' draws unchanged.

Speed: the warp is OpenCV's `warpAffine`, reading the memory-mapped cache in place: 2-3 ms of CPU for a
1024 x 1024 bilinear crop and 1-2 ms nearest (Pillow's affine transform took 12 ms, scipy's longer still); a crop with
the paper's augmentations costs about 9 ms of CPU, two thirds of it the two warps. OpenCV's 8-bit bilinear samples at
positions rounded to 1/32 px and rounds to the nearest gray level: unbiased, within 0.5 + (|d/drow| + |d/dcol|) / 60
gray levels of scipy.ndimage.affine_transform(order=1), so within 1 where neighbouring pixels differ by less than
15 levels (on ISBI 2012 EM slices: over 99 % of pixels within 1, all within 2.5). Right angles and whole-pixel maps are
exact. Intensity changes are one OpenCV lookup table; only the augmentations that fire cost anything.
"""

import dataclasses
import math
from collections.abc import Sequence

import cv2
import numpy as np
from PIL import Image


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Probabilities and ranges of the augmentations (each `*_p` is the chance it is applied to an example).

  Attributes:
    flip_p: chance of a flip, for each axis independently.
    rot90: rotate by a uniformly random multiple of 90 degrees.
    rotate_p, rotate_degrees: rotation by an angle uniform in [-rotate_degrees, rotate_degrees] (45 covers every
      angle together with rot90).
    zoom_p, zoom_range: magnification, log-uniform in the range (> 1 enlarges).
    crop_p, crop_area, crop_aspect: crop a sub-window of the crop (area fraction uniform in crop_area, aspect ratio
      log-uniform in crop_aspect, placed uniformly) and resize it to the crop size.
    translate_p, translate_fraction: shift by up to this fraction of the crop size along each axis.
    contrast_p, contrast_range: scale gray values about the crop's mean by a log-uniform factor.
    brightness_p, brightness_range: add a uniform offset in [-range, range] (fraction of the gray range).
    gamma_p, gamma_range: gray' = gray ** gamma on [0, 1], gamma log-uniform in the range.
    cutout_p, cutout_area, cutout_blob: replace a blob-shaped region (area fraction uniform in cutout_area, blobs
      about cutout_blob x crop size across) with noise of the crop's mean and standard deviation.
    threads: OpenCV threads that warp a crop (not an augmentation: the crops do not depend on it). OpenCV's thread
      count is global to a process; every warp sets it to this value, so worker processes (config.data.num_workers
      > 0) keep to 1 thread each instead of OpenCV's default of one per core. Worth 2-4 only when the pipeline runs
      in the training process (num_workers = 0) and cores are idle.
  """
  flip_p: float = 0.5
  rot90: bool = True
  rotate_p: float = 0.0
  rotate_degrees: float = 45.0
  zoom_p: float = 0.0
  zoom_range: tuple[float, float] = (0.8, 1.25)
  crop_p: float = 0.0
  crop_area: tuple[float, float] = (0.5, 1.0)
  crop_aspect: tuple[float, float] = (0.75, 4 / 3)
  translate_p: float = 0.0
  translate_fraction: float = 0.125
  contrast_p: float = 0.0
  contrast_range: tuple[float, float] = (0.75, 1.33)
  brightness_p: float = 0.0
  brightness_range: float = 0.1
  gamma_p: float = 0.0
  gamma_range: tuple[float, float] = (0.75, 1.33)
  cutout_p: float = 0.0
  cutout_area: tuple[float, float] = (0.02, 0.1)
  cutout_blob: float = 0.125
  threads: int = 1

  def __post_init__(self):
    problems = [f"{name}={getattr(self, name)} is not a probability in [0, 1]"
                for name in PROBABILITIES if not 0 <= getattr(self, name) <= 1]
    for name, low, high in (("zoom_range", 0.0, None), ("crop_area", 0.0, 1.0), ("crop_aspect", 0.0, None),
                            ("contrast_range", 0.0, None), ("gamma_range", 0.0, None), ("cutout_area", 0.0, 1.0)):
      value = tuple(getattr(self, name))
      if (len(value) != 2 or not value[0] <= value[1] or value[0] <= low
          or (high is not None and value[1] > high)):
        bounds = f"({low}, {high}]" if high is not None else f"> {low}"
        problems.append(f"{name}={value} must be a (low, high) pair with low <= high, both {bounds}")
    if not 0 <= self.rotate_degrees <= 180:
      problems.append(f"rotate_degrees={self.rotate_degrees} must be in [0, 180]")
    if not 0 <= self.translate_fraction <= 1:
      problems.append(f"translate_fraction={self.translate_fraction} must be in [0, 1]")
    if not 0 <= self.brightness_range <= 1:
      problems.append(f"brightness_range={self.brightness_range} must be in [0, 1]")
    if not 0 < self.cutout_blob <= 1:
      problems.append(f"cutout_blob={self.cutout_blob} must be in (0, 1]")
    if not isinstance(self.threads, int) or self.threads < 1:
      problems.append(f"threads={self.threads!r} must be a whole number >= 1")
    if problems:
      raise ValueError("Invalid config.data.augment: " + "; ".join(problems) + ".")

  @classmethod
  def from_config(cls, config) -> "AugmentConfig":
    """From a ConfigDict or dict with any of the field names (lists become tuples)."""
    values = dict(config.to_dict() if hasattr(config, "to_dict") else config)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"Unknown config.data.augment keys {unknown}; known keys: {sorted(known)}.")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

  @classmethod
  def paper(cls, **overrides) -> "AugmentConfig":
    """All of the paper's eight augmentations plus cutout, each applied to a share of the examples."""
    values = dict(flip_p=0.5, rot90=True, rotate_p=0.5, zoom_p=0.3, crop_p=0.3, translate_p=0.3, contrast_p=0.5,
                  brightness_p=0.5, gamma_p=0.3, cutout_p=0.2)
    values.update(overrides)
    return cls(**values)


PROBABILITIES = ("flip_p", "rotate_p", "zoom_p", "crop_p", "translate_p", "contrast_p", "brightness_p", "gamma_p",
                 "cutout_p")


@dataclasses.dataclass(frozen=True)
class AugmentParams:
  """The augmentation drawn for one example; identity values where an augmentation did not happen.

  Attributes:
    flip_rows, flip_cols: flip upside down / left-right.
    quarter_turns: counter-clockwise right-angle rotations (np.rot90).
    angle: rotation in degrees (0 = none).
    zoom: magnification (1 = none).
    crop_fraction: (rows, cols) side of the cropped sub-window as a fraction of the crop ((1, 1) = none).
    crop_shift, translation: (rows, cols) moves of the crop's centre in source pixels.
    contrast, brightness, gamma: intensity changes (1, 0, 1 = none).
    cutout_area: share of the crop replaced by noise (0 = none).
    noise_seed: seed of the cutout's random field and fill.
  """
  flip_rows: bool = False
  flip_cols: bool = False
  quarter_turns: int = 0
  angle: float = 0.0
  zoom: float = 1.0
  crop_fraction: tuple[float, float] = (1.0, 1.0)
  crop_shift: tuple[int, int] = (0, 0)
  translation: tuple[int, int] = (0, 0)
  contrast: float = 1.0
  brightness: float = 0.0
  gamma: float = 1.0
  cutout_area: float = 0.0
  noise_seed: int = 0

  @property
  def center_shift(self) -> tuple[int, int]:
    """Total move of the crop's centre in source pixels."""
    return (self.crop_shift[0] + self.translation[0], self.crop_shift[1] + self.translation[1])


def _log_uniform(rng: np.random.Generator, bounds) -> float:
  low, high = bounds
  return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def sample(rng: np.random.Generator, config: AugmentConfig, crop_size: int) -> AugmentParams:
  """Draws one example's augmentation. The number and order of draws does not depend on `config`."""
  happens = rng.random(len(PROBABILITIES) + 1)  # +1: the second flip axis
  on = dict(zip(("flip_rows", "flip_cols") + PROBABILITIES[1:], happens))
  on = {name: bool(u < (config.flip_p if name.startswith("flip_") else getattr(config, name)))
        for name, u in on.items()}
  quarter_turns = int(rng.integers(0, 4))
  angle = float(rng.uniform(-config.rotate_degrees, config.rotate_degrees))
  zoom = _log_uniform(rng, config.zoom_range)
  area = float(rng.uniform(*config.crop_area))
  aspect = _log_uniform(rng, config.crop_aspect)
  crop_offset = rng.uniform(-1, 1, size=2)
  translate = rng.uniform(-1, 1, size=2)
  contrast = _log_uniform(rng, config.contrast_range)
  brightness = float(rng.uniform(-config.brightness_range, config.brightness_range))
  gamma = _log_uniform(rng, config.gamma_range)
  cutout_area = float(rng.uniform(*config.cutout_area))
  noise_seed = int(rng.integers(0, 2**63))

  crop_fraction = (min(1.0, math.sqrt(area / aspect)), min(1.0, math.sqrt(area * aspect)))
  half_room = [(1 - f) * crop_size / 2 for f in crop_fraction]
  return AugmentParams(
      flip_rows=on["flip_rows"], flip_cols=on["flip_cols"],
      quarter_turns=quarter_turns if config.rot90 else 0,
      angle=angle if on["rotate_p"] else 0.0,
      zoom=zoom if on["zoom_p"] else 1.0,
      crop_fraction=crop_fraction if on["crop_p"] else (1.0, 1.0),
      crop_shift=tuple(int(round(o * r)) for o, r in zip(crop_offset, half_room)) if on["crop_p"] else (0, 0),
      translation=(tuple(int(round(t * config.translate_fraction * crop_size)) for t in translate)
                   if on["translate_p"] else (0, 0)),
      contrast=contrast if on["contrast_p"] else 1.0,
      brightness=brightness if on["brightness_p"] else 0.0,
      gamma=gamma if on["gamma_p"] else 1.0,
      cutout_area=cutout_area if on["cutout_p"] else 0.0,
      noise_seed=noise_seed)


# ----------------------------------------------------------------------------------------------------------------
# Geometry


def linear_map(params: AugmentParams) -> np.ndarray:
  """float64 [2, 2]: source offset (rows, cols) per crop offset from the crop's centre, before flips/rot90."""
  theta = math.radians(params.angle)
  rotation = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
  linear = rotation @ np.diag(params.crop_fraction) / params.zoom
  # cos(90 deg) is 6e-17, not 0: snap so that right angles stay whole-pixel maps, exact in both interpolations
  # (a position a hair off a half pixel could send nearest neighbour to the other side).
  snapped = np.round(linear)
  return np.where(np.abs(linear - snapped) < 1e-9, snapped, linear)


def is_identity(linear: np.ndarray) -> bool:
  return bool(np.array_equal(linear, np.eye(2)))


def half_extent(linear: np.ndarray, crop_size: int) -> tuple[float, float]:
  """(rows, cols) half size of the source region the crop's pixel centres map to."""
  half = (crop_size - 1) / 2
  return float(half * np.abs(linear[0]).sum()), float(half * np.abs(linear[1]).sum())


def source_box(center: tuple[float, float], linear: np.ndarray, crop_size: int) -> tuple[int, int, int, int]:
  """(top, left, height, width) of a window holding every source pixel a bilinear warp reads, plus one pixel."""
  extent = half_extent(linear, crop_size)
  top, left = (int(math.floor(c - e)) - 1 for c, e in zip(center, extent))
  bottom, right = (int(math.floor(c + e)) + 3 for c, e in zip(center, extent))
  return top, left, bottom - top, right - left


_INTERPOLATIONS = {0: cv2.INTER_NEAREST, 1: cv2.INTER_LINEAR}


def warp(window: np.ndarray, linear: np.ndarray, center: tuple[float, float], crop_size: int, *,
         order: int) -> np.ndarray:
  """Samples a crop_size^2 crop whose centre maps to `center` (window pixel coordinates) under `linear`.

  Crop pixel p (row, col) reads window position linear @ (p - c) + center with c = ((S - 1) / 2, (S - 1) / 2),
  pixel centres at integer coordinates, the same convention as scipy.ndimage.affine_transform. Positions past the
  window's edge read it mirrored without repeating the edge pixel (-1 is 1), as `NpyWindows.read` does past the
  image's edge; crops of the pipeline never get there (their windows hold every pixel they read).

  Args:
    window: uint8 [h, w] source pixels (any strides, e.g. a view of a memory-mapped file), h and w < 32767.
    linear: [2, 2] map from `linear_map`.
    center: (row, col) in window coordinates.
    crop_size: output side S.
    order: 1 = bilinear (images), 0 = nearest neighbour (labels).

  Returns:
    uint8 [S, S].
  """
  return warp_windows([window], linear, center, crop_size, orders=(order,))[0]


def warp_windows(windows: Sequence[np.ndarray], linear: np.ndarray, center: tuple[float, float], crop_size: int, *,
                 orders: Sequence[int] = (1, 0), threads: int = 1) -> list[np.ndarray]:
  """`warp` of several windows with one map (an image bilinearly, its label by nearest neighbour).

  Args:
    windows: uint8 [h, w] source pixels per window (views are read in place, without copies).
    linear, center, crop_size: as for `warp`.
    orders: interpolation order of each window.
    threads: OpenCV threads (process-wide, see `AugmentConfig.threads`); the pixels do not depend on it.

  Returns:
    uint8 [S, S] per window.
  """
  c = (crop_size - 1) / 2
  offset = np.asarray(center, np.float64) - linear @ np.array([c, c])
  # OpenCV's inverse map takes output (x, y) = (col, row) to input (x, y), pixel centres at integers like ours.
  matrix = np.array([[linear[1, 1], linear[1, 0], offset[1]], [linear[0, 1], linear[0, 0], offset[0]]])
  if cv2.getNumThreads() != threads:
    cv2.setNumThreads(threads)
  outputs = []
  for window, order in zip(windows, orders, strict=True):
    window = np.asarray(window)
    if window.dtype != np.uint8 or window.ndim != 2:
      raise ValueError(f"Warped windows must be uint8 [h, w] arrays, got {window.dtype} {window.shape}.")
    outputs.append(cv2.warpAffine(window, matrix, (crop_size, crop_size),
                                  flags=_INTERPOLATIONS[order] | cv2.WARP_INVERSE_MAP,
                                  borderMode=cv2.BORDER_REFLECT_101))
  return outputs


def dihedral(array: np.ndarray, params: AugmentParams) -> np.ndarray:
  """Applies the flips, then the right-angle rotation, to [H, W, ...] (H == W when rotating by odd turns)."""
  if params.flip_rows:
    array = array[::-1]
  if params.flip_cols:
    array = array[:, ::-1]
  if params.quarter_turns:
    array = np.rot90(array, params.quarter_turns)
  return array


def dihedral_map(params: AugmentParams) -> np.ndarray:
  """int [2, 2] M with dihedral(a)[q] = a[M (q - c) + c] about the centre c of a square array.

  Folding M into a warp's linear map (linear @ M) applies the flips and right-angle rotation during the warp, with
  no extra pass over the crop.
  """
  flips = np.diag([-1 if params.flip_rows else 1, -1 if params.flip_cols else 1])
  quarter = np.array([[0, 1], [-1, 0]])  # np.rot90(a)[i, j] = a[j, n - 1 - i]
  return flips @ np.linalg.matrix_power(quarter, params.quarter_turns % 4)


def random_dihedral(rng: np.random.Generator, image: np.ndarray, label: np.ndarray, *, flips: bool = True,
                    rotations: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Applies the same random flip / right-angle rotation to `image` and `label` ([H, W, ...], H == W for rotations).

  The random draws happen whether or not a transform is enabled, so switching one off does not shift the others.
  """
  flip_rows, flip_cols = rng.integers(0, 2, size=2)
  quarter_turns = int(rng.integers(0, 4))
  params = AugmentParams(flip_rows=bool(flips and flip_rows), flip_cols=bool(flips and flip_cols),
                         quarter_turns=quarter_turns if rotations else 0)
  return np.ascontiguousarray(dihedral(image, params)), np.ascontiguousarray(dihedral(label, params))


# ----------------------------------------------------------------------------------------------------------------
# Intensity


def intensity_table(params: AugmentParams, mean: float) -> np.ndarray | None:
  """uint8 [256] lookup table of contrast (about `mean`, a gray level), brightness and gamma; None if identity."""
  if params.contrast == 1 and params.brightness == 0 and params.gamma == 1:
    return None
  gray = np.arange(256, dtype=np.float64) / 255
  if params.contrast != 1:
    center = mean / 255
    gray = center + params.contrast * (gray - center)
  gray = np.clip(gray + params.brightness, 0, 1) ** params.gamma
  return np.round(gray * 255).astype(np.uint8)


def adjust_intensity(image: np.ndarray, params: AugmentParams) -> np.ndarray:
  """Contrast, brightness and gamma of a uint8 image ([H, W]); returns it unchanged when none applies.

  The crop's mean is only needed for contrast. OpenCV's mean and table lookup take 0.4 ms for 1024 x 1024 px
  (numpy's mean and take 1.8 ms, Pillow's point 2.8 ms).
  """
  if params.contrast == 1 and params.brightness == 0 and params.gamma == 1:
    return image
  table = intensity_table(params, cv2.mean(image)[0] if params.contrast != 1 else 0.0)
  return cv2.LUT(image, table)


def cutout_mask(params: AugmentParams, shape: tuple[int, int], blob: float) -> np.ndarray:
  """bool [H, W]: blobs covering about `params.cutout_area` of the crop, from a smooth random field.

  A coarse uniform grid (cells `blob` x size) is bilinearly upsampled to a quarter of the size, thresholded at the
  quantile that leaves the wanted area, and enlarged by pixel repetition: blob-shaped, noise-like outlines.
  """
  rng = np.random.default_rng(params.noise_seed)
  height, width = shape
  small = (max(1, -(-height // 4)), max(1, -(-width // 4)))
  grid = (max(2, math.ceil(1 / blob) + 1), max(2, math.ceil(1 / blob) + 1))
  field = rng.random(grid, dtype=np.float32)
  smooth = np.asarray(Image.fromarray(field, mode="F").resize((small[1], small[0]), Image.Resampling.BILINEAR))
  threshold = np.quantile(smooth, 1 - params.cutout_area)
  mask = smooth > threshold
  return np.repeat(np.repeat(mask, 4, axis=0), 4, axis=1)[:height, :width]


def apply_cutout(image: np.ndarray, params: AugmentParams, blob: float) -> np.ndarray:
  """Fills the cutout blobs of a uint8 [H, W] image with Gaussian noise of its mean and standard deviation."""
  if params.cutout_area <= 0:
    return image
  mask = cutout_mask(params, image.shape, blob)
  count = int(np.count_nonzero(mask))
  if not count:
    return image
  rng = np.random.default_rng([params.noise_seed, 1])
  image = np.array(image)
  sample = image[::4, ::4]  # the fill's statistics need no more than a sixteenth of the pixels
  mean, std = float(sample.mean()), float(sample.std())
  fill = rng.normal(mean, max(std, 1.0), size=count)
  image[mask] = np.clip(np.round(fill), 0, 255).astype(np.uint8)
  return image
