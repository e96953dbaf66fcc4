"""Reading and writing 8-bit gray EM images, with errors that name the file and the fix.

EM releases store gray images in several containers: U-RISC images are 3-channel PNGs whose channels are equal, its
labels are 8-bit TIFFs, ISBI slices are 1-channel PNGs. `read_gray` accepts all of them and refuses, with one clear
message, anything that is not 8-bit gray (16-bit, colour, a transparent pixel, a corrupt or truncated file).
Writers are atomic (temporary name, then os.replace) so an interrupted run never leaves a half-written file behind.
"""

import pathlib
import threading
import warnings

import numpy as np
from PIL import Image

from urisc_jax.outputs import atomic_path

# U-RISC Track 1 images have 99 Mpix, above Pillow's default decompression-bomb limit (89 Mpix warns, 179 Mpix
# fails); EM images this project reads can be larger still.
_MAX_PIXELS = 1 << 32
_open_lock = threading.Lock()
_TIFF_SUFFIXES = (".tif", ".tiff")


class DataError(ValueError):
  """A data file or folder is missing, unreadable or inconsistent; the message names it and says how to fix it."""


class MissingDataError(DataError, FileNotFoundError):
  """A file or folder the data layout needs does not exist."""


def read_gray(path) -> np.ndarray:
  """Reads an 8-bit gray image (1 channel, or RGB/RGBA with equal channels and no transparency).

  Args:
    path: an image file Pillow or tifffile can read (PNG, TIFF, ...).

  Returns:
    uint8 [H, W].

  Raises:
    MissingDataError: the file does not exist.
    DataError: the file is corrupt, not 8-bit, or not gray.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise MissingDataError(f"image file {path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
  try:
    return _read_with_pillow(path)
  except _PillowFailed as pillow_error:
    if path.suffix.lower() not in _TIFF_SUFFIXES:
      raise DataError(f"cannot read {path}: {pillow_error}. The file is corrupt, truncated or not an image; "
                      "replace it with an intact copy.") from None
    # tifffile reads TIFF variants Pillow does not (BigTIFF, some compressions).
    return _read_with_tifffile(path, pillow_error)


class _PillowFailed(Exception):
  pass


def open_large_image(path) -> Image.Image:
  """`PIL.Image.open` that accepts images of up to 2^32 pixels (U-RISC's 99 Mpix trip Pillow's bomb check)."""
  with _open_lock, warnings.catch_warnings():
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, _MAX_PIXELS
    try:
      return Image.open(path)
    finally:
      Image.MAX_IMAGE_PIXELS = previous


def _read_with_pillow(path: pathlib.Path) -> np.ndarray:
  try:
    image = open_large_image(path)
    with image:
      image.load()
      return _pillow_to_gray(image, path)
  except DataError:
    raise
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, EOFError) as e:
    raise _PillowFailed(str(e) or type(e).__name__) from None


def _pillow_to_gray(image: Image.Image, path: pathlib.Path) -> np.ndarray:
  mode = image.mode
  if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F") or mode.startswith("I;"):
    bits = "16-bit" if mode.startswith("I;16") else "32-bit"
    raise DataError(f"{path} is a {bits} image (Pillow mode {mode}); this project reads 8-bit gray only. Convert it "
                    "to 8-bit, e.g. scale to 0..255 and save as uint8.")
  if mode == "1":
    image = image.convert("L")
  elif mode == "P":
    image = image.convert("RGBA")
  mode = image.mode
  if mode == "L":
    return np.asarray(image).copy()
  if mode in ("LA", "RGB", "RGBA"):
    bands = [np.asarray(band) for band in image.split()]
    return _equal_channels_to_gray(bands, path, has_alpha=mode in ("LA", "RGBA"))
  raise DataError(f"{path} has Pillow mode {mode}; it must be 8-bit grayscale (or RGB with equal channels). "
                  "Convert it to gray, e.g. PIL.Image.open(path).convert('L').")


def _equal_channels_to_gray(bands: list[np.ndarray], path: pathlib.Path, *, has_alpha: bool) -> np.ndarray:
  if has_alpha:
    alpha = bands.pop()
    if alpha.min() != 255:
      raise DataError(f"{path} has transparent pixels (alpha < 255); it must be an opaque grayscale image. "
                      "Flatten or drop the alpha channel.")
  gray = bands[0]
  for index, band in enumerate(bands[1:], start=1):
    if not np.array_equal(band, gray):
      differing = int(np.count_nonzero(band != gray))
      raise DataError(f"{path} is a colour image: channel {index} differs from channel 0 at {differing} pixels. It "
                      "must be grayscale (one channel, or RGB with equal channels); convert it to gray first.")
  return np.ascontiguousarray(gray)


def _read_with_tifffile(path: pathlib.Path, pillow_error: Exception) -> np.ndarray:
  import tifffile  # pylint: disable=g-import-not-at-top

  try:
    array = tifffile.imread(path)
  except Exception as e:  # tifffile raises many types for corrupt input  # pylint: disable=broad-except
    raise DataError(f"cannot read {path}: {pillow_error} (tifffile: {e}). The file is corrupt, truncated or not a "
                    "TIFF image; replace it with an intact copy.") from None
  if array.dtype != np.uint8:
    raise DataError(f"{path} holds {array.dtype} pixels; this project reads 8-bit gray only. Convert it to uint8.")
  if array.ndim == 2:
    return array
  if array.ndim == 3 and array.shape[-1] in (2, 3, 4):
    bands = [array[..., c] for c in range(array.shape[-1])]
    return _equal_channels_to_gray(bands, path, has_alpha=array.shape[-1] in (2, 4))
  raise DataError(f"{path} holds an array of shape {array.shape}; expected one 2-D gray image. Save a single page.")


def write_png(path, gray: np.ndarray, *, channels: int = 1, compress_level: int = 1) -> pathlib.Path:
  """Writes uint8 [H, W] as a gray PNG with 1 channel, or 3 equal channels like the U-RISC release."""
  gray = _check_gray_uint8(gray, path)
  image = Image.fromarray(gray, mode="L")
  if channels == 3:
    image = Image.merge("RGB", (image, image, image))
  elif channels != 1:
    raise ValueError(f"channels must be 1 or 3, got {channels}")
  with atomic_path(path) as tmp:
    image.save(tmp, format="PNG", compress_level=compress_level)
  return pathlib.Path(path)


def write_tiff(path, gray: np.ndarray) -> pathlib.Path:
  """Writes uint8 [H, W] as a deflate-compressed 8-bit gray TIFF."""
  gray = _check_gray_uint8(gray, path)
  with atomic_path(path) as tmp:
    Image.fromarray(gray, mode="L").save(tmp, format="TIFF", compression="tiff_adobe_deflate")
  return pathlib.Path(path)


def _check_gray_uint8(gray: np.ndarray, path) -> np.ndarray:
  gray = np.asarray(gray)
  if gray.ndim != 2 or gray.dtype != np.uint8:
    raise ValueError(f"writing {path}: expected a uint8 [H, W] array, got {gray.dtype} {gray.shape}")
  return np.ascontiguousarray(gray)
