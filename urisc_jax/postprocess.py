"""Clean-up of a thresholded membrane mask: closing, small-component removal, small-hole filling.

All steps are off by default (`config.predict.postprocess`); each is a pure function of a boolean mask [H, W] that
returns a new mask. They work on U-RISC's 9958 x 9959 px images in bounded memory: boolean arrays (1 byte a pixel)
and one int32 label image (4 bytes a pixel), never a float copy.

Connectivity: membrane is a thin curve, so a membrane component is 8-connected (a diagonal step continues a line);
background is then 4-connected, the dual choice, so that a one-pixel diagonal membrane line separates two cells.
"""

from collections.abc import Mapping

import numpy as np
from scipy import ndimage

OPTIONS = ("min_membrane_size", "fill_holes_below", "closing_radius")

_EIGHT_CONNECTED = np.ones((3, 3), bool)
_FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)


def _check_mask(mask: np.ndarray, what: str) -> np.ndarray:
  mask = np.asarray(mask)
  if mask.ndim != 2 or mask.dtype != bool:
    raise ValueError(f"{what} expects a boolean membrane mask [H, W], got {mask.dtype} of shape {mask.shape}: "
                     "threshold the probability map first (probability >= threshold).")
  return mask


def _check_size(value, name: str) -> int:
  try:
    whole = not isinstance(value, bool) and float(value).is_integer() and value >= 0
  except (TypeError, ValueError):
    whole = False
  if not whole:
    raise ValueError(f"config.predict.postprocess.{name} must be a non-negative whole number of pixels "
                     f"(0 = off), got {value!r}.")
  return int(value)


def _row_bands(shape: tuple[int, int], pixels: int = 1 << 22):
  """Slices of consecutive rows of about `pixels` pixels each: numpy turns int32 indices into int64 copies, so index
  work on a label image goes band by band to keep such copies small."""
  rows = max(1, pixels // max(1, shape[1]))
  return [slice(top, top + rows) for top in range(0, shape[0], rows)]


def _small_components(mask: np.ndarray, below: int, structure: np.ndarray) -> np.ndarray:
  """Boolean [H, W]: pixels of the `structure`-connected components of `mask` with fewer than `below` pixels."""
  labels, count = ndimage.label(mask, structure=structure, output=np.int32)
  small_pixels = np.zeros(mask.shape, bool)
  if count == 0:
    return small_pixels
  bands = _row_bands(labels.shape)
  sizes = np.zeros(count + 1, np.int64)
  for rows in bands:
    sizes += np.bincount(labels[rows].ravel(), minlength=count + 1)
  small = sizes < below
  small[0] = False  # label 0 is everything outside `mask`
  for rows in bands:
    small_pixels[rows] = small[labels[rows]]
  return small_pixels


def remove_small_membrane(mask: np.ndarray, min_size: int) -> np.ndarray:
  """Removes 8-connected membrane components of fewer than `min_size` pixels (isolated specks of noise).

  Args:
    mask: bool [H, W], True = membrane.
    min_size: components with fewer pixels are removed; 0 or 1 keeps all.

  Returns:
    A new bool [H, W] mask.
  """
  mask = _check_mask(mask, "remove_small_membrane")
  min_size = _check_size(min_size, "min_membrane_size")
  if min_size <= 1:
    return mask.copy()
  kept = _small_components(mask, min_size, _EIGHT_CONNECTED)
  np.logical_not(kept, out=kept)
  return np.logical_and(kept, mask, out=kept)


def fill_small_holes(mask: np.ndarray, below: int) -> np.ndarray:
  """Turns 4-connected background components of fewer than `below` pixels into membrane.

  Such "cells" are too small to be cells: a gap inside a thick membrane, or a loop of noise. A background region cut
  by the image border counts by the pixels inside the image, as in `skimage.morphology.remove_small_holes`.

  Args:
    mask: bool [H, W], True = membrane.
    below: background components with fewer pixels are filled; 0 or 1 fills none.

  Returns:
    A new bool [H, W] mask.
  """
  mask = _check_mask(mask, "fill_small_holes")
  below = _check_size(below, "fill_holes_below")
  if below <= 1:
    return mask.copy()
  filled = _small_components(~mask, below, _FOUR_CONNECTED)
  return np.logical_or(filled, mask, out=filled)


def disk(radius: int) -> np.ndarray:
  """The footprint of a disk, bool [2r + 1, 2r + 1]: offsets (dy, dx) with dy^2 + dx^2 <= r^2."""
  offsets = np.arange(-radius, radius + 1)
  return offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius ** 2


def close_membrane(mask: np.ndarray, radius: int) -> np.ndarray:
  """Morphological closing (dilation, then erosion) with a disk of `radius` px: bridges gaps in broken membranes.

  Beyond the image border nothing is added by the dilation and nothing removed by the erosion, so the result always
  contains the input (as `skimage.morphology.binary_closing`, mode 'ignore').

  Args:
    mask: bool [H, W], True = membrane.
    radius: disk radius in pixels; 0 leaves the mask as it is.

  Returns:
    A new bool [H, W] mask.
  """
  mask = _check_mask(mask, "close_membrane")
  radius = _check_size(radius, "closing_radius")
  if radius == 0:
    return mask.copy()
  footprint = disk(radius)
  dilated = ndimage.binary_dilation(mask, structure=footprint, border_value=0)
  return ndimage.binary_erosion(dilated, structure=footprint, border_value=1)


def options_from(config: Mapping | None) -> dict[str, int]:
  """The post-processing options of `config.predict.postprocess` (missing ones off), checked."""
  config = {} if config is None else dict(config)
  unknown = sorted(set(config) - set(OPTIONS))
  if unknown:
    raise ValueError(f"config.predict.postprocess has unknown option(s) {unknown}; valid: {', '.join(OPTIONS)}.")
  return {name: _check_size(config.get(name, 0), name) for name in OPTIONS}


def is_enabled(config: Mapping | None) -> bool:
  """Whether `config.predict.postprocess` changes a mask at all."""
  options = options_from(config)
  return options["closing_radius"] > 0 or options["min_membrane_size"] > 1 or options["fill_holes_below"] > 1


def postprocess(mask: np.ndarray, config: Mapping | None) -> np.ndarray:
  """Applies what `config.predict.postprocess` enables, in this order: closing (so that fragments of a broken
  membrane join before sizes are counted), small-membrane removal, small-hole filling.

  Args:
    mask: bool [H, W], True = membrane (probability >= threshold).
    config: a mapping with `min_membrane_size`, `fill_holes_below` and `closing_radius` (0 = off); None = all off.

  Returns:
    bool [H, W]: a new mask (the input is never modified).
  """
  mask = _check_mask(mask, "postprocess")
  options = options_from(config)
  result = mask
  if options["closing_radius"]:
    result = close_membrane(result, options["closing_radius"])
  if options["min_membrane_size"] > 1:
    result = remove_small_membrane(result, options["min_membrane_size"])
  if options["fill_holes_below"] > 1:
    result = fill_small_holes(result, options["fill_holes_below"])
  return mask.copy() if result is mask else result
