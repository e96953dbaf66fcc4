"""Anti-aliased resampling of gray images, probability maps and masks between pixel sizes.

Used where an image must be seen at another resolution than it was recorded at: the paper's attribution protocol
(inputs resized to 512 x 512) and prediction on data whose pixel size differs from the training data's
(`config.data.pixel_nm`). Downsampling averages over each output pixel's footprint (Pillow's resize widens its
filter by the scale factor), so fine structure does not alias into false membranes; upsampling interpolates.
"""

import numpy as np
from PIL import Image

_FILTER = Image.Resampling.BILINEAR


def _check_shape(shape) -> tuple[int, int]:
  height, width = (int(s) for s in shape)
  if height < 1 or width < 1:
    raise ValueError(f"Cannot resample to {height} x {width} px: both sides must be at least 1.")
  return height, width


def resize(array: np.ndarray, shape) -> np.ndarray:
  """float32 [h, w]: a 2-D array [H, W] (any real dtype) resampled to `shape` = (h, w), anti-aliased bilinear."""
  array = np.asarray(array)
  if array.ndim != 2:
    raise ValueError(f"resize takes a 2-D array [H, W], got shape {array.shape}.")
  height, width = _check_shape(shape)
  if array.shape == (height, width):
    return array.astype(np.float32)
  image = Image.fromarray(np.ascontiguousarray(array, np.float32), mode="F")
  return np.asarray(image.resize((width, height), _FILTER), np.float32)


def resize_gray(image: np.ndarray, shape) -> np.ndarray:
  """uint8 [h, w]: a gray uint8 image resampled to `shape`, anti-aliased, rounded."""
  return np.clip(np.rint(resize(image, shape)), 0, 255).astype(np.uint8)


def resize_mask(mask: np.ndarray, shape) -> np.ndarray:
  """bool [h, w]: a mask resampled to `shape`; an output pixel is set when at least half of its footprint is."""
  return resize(np.asarray(mask, np.float32), shape) >= 0.5


def scaled_shape(shape, factor: float) -> tuple[int, int]:
  """(round(H x factor), round(W x factor)), at least 1 px each."""
  return tuple(max(1, int(round(s * factor))) for s in shape[:2])
