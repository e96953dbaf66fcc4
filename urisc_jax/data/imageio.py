"""Reading and writing 8-bit gray EM images, with errors that name the file and the fix.

EM releases store gray images in several containers: U-RISC images are 3-channel PNGs whose channels are equal, its
labels are 8-bit TIFFs, ISBI slices are 1-channel PNGs. `read_gray` accepts all of them and refuses, with one clear
message, anything that is not 8-bit gray (16-bit, colour, a transparent pixel, a corrupt or truncated file).
Writers are atomic (temporary name, then os.replace) so an interrupted run never leaves a half-written file behind.

Both image readers, `read_gray` here and the scorer's `urisc_jax.evaluation.f1.read_gray8`, apply one pixel cap
(`set_max_pixels`, config.data.max_image_pixels, or a reader's `max_pixels=` argument), checked from the file's
header before any pixel is decoded: a PNG or TIFF of a few hundred KB can declare 20000 x 20000 pixels and decode to
gigabytes (a decompression bomb).
"""

import contextlib
import numbers
import os
import pathlib
import struct
import threading

import numpy as np
from PIL import Image

from urisc_jax.outputs import atomic_path

# 2^28 = 268 Mpix: U-RISC Track 1 images (9958 x 9959 = 99 Mpix) and 16384 x 16384 pass; a 30000 x 30000 image
# (900 Mpix, 0.9 GB as uint8 and several times that while decoding) needs the cap raised on purpose.
DEFAULT_MAX_PIXELS = 1 << 28
_max_pixels = DEFAULT_MAX_PIXELS
_TIFF_SUFFIXES = (".tif", ".tiff")
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic TIFF and BigTIFF, both byte orders
# The readers here take single images; ISBI's 30-slice stacks go through urisc_jax.data.sources.
MAX_TIFF_PAGES = 1024
# Pillow's own bomb check is off while any read here runs (see `_pillow_limit_off`).
_pillow_lock = threading.Lock()
_pillow_readers = 0
_pillow_saved_limit = None


class DataError(ValueError):
  """A data file or folder is missing, unreadable or inconsistent; the message names it and says how to fix it."""


class MissingDataError(DataError, FileNotFoundError):
  """A file or folder the data layout needs does not exist."""


def set_max_pixels(n: int | None) -> int:
  """Sets the process-wide pixel cap of every image read (config.data.max_image_pixels); returns the previous one.

  Args:
    n: the most pixels (width x height) an image may declare; None restores DEFAULT_MAX_PIXELS.
  """
  global _max_pixels
  previous, _max_pixels = _max_pixels, _checked_cap(n, "config.data.max_image_pixels")
  return previous


def max_pixels() -> int:
  """The process-wide pixel cap of image reads (DEFAULT_MAX_PIXELS unless `set_max_pixels` changed it)."""
  return _max_pixels


def _checked_cap(n, what: str) -> int:
  if n is None:
    return DEFAULT_MAX_PIXELS
  if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n <= 0:
    raise ValueError(f"{what} must be a positive whole number of pixels, got {n!r}; the default is "
                     f"{DEFAULT_MAX_PIXELS} (2^28, a 16384 x 16384 image).")
  return int(n)


def _cap(max_pixels_arg) -> int:
  """The cap one read applies: its own `max_pixels` argument, else the process-wide setting."""
  return _max_pixels if max_pixels_arg is None else _checked_cap(max_pixels_arg, "max_pixels")


def check_pixels(path, width: int, height: int, *, max_pixels: int | None = None, what: str = "image") -> None:
  """Refuses an image whose header declares no pixels or more than the cap, before anything decodes it.

  Args:
    path: the file, named in the error.
    width, height: the size its header declares.
    max_pixels: this read's cap; None uses the process-wide one (`set_max_pixels`).
    what: what has that size, for the message: "image", or "tile" (a TIFF tile is decoded into a buffer of its
      declared size, whatever the image's).

  Raises:
    DataError: the image is empty or above the cap; the message says how to raise the cap.
  """
  cap = _cap(max_pixels)
  width, height = int(width), int(height)
  if width <= 0 or height <= 0:
    raise DataError(f"{path} declares a {width} x {height} {what}, which holds no pixels; the file is damaged or "
                    "was written empty. Replace it with an intact copy.")
  pixels = width * height
  if pixels > cap:
    raise DataError(
        f"{path} declares a {width} x {height} {what} ({pixels:,} pixels), more than the limit of {cap:,} pixels that "
        "guards against decompression bombs (small files that decode to gigabytes); it was not decoded. Raise the "
        "limit with --config.data.max_image_pixels=N (or urisc_jax.data.imageio.set_max_pixels(N)) if the image is "
        f"genuine: this one needs N >= {pixels}.")


@contextlib.contextmanager
def _pillow_limit_off():
  """Keeps Pillow's own bomb check (warns above 89 Mpix, fails above 179 Mpix, in `Image.open` and again when a
  TIFF loads) from firing before or instead of `check_pixels`, with a message that names neither the file nor the
  fix. Counted rather than locked across the read, so concurrent reads do not wait on each other; Pillow's setting
  comes back when the last read ends."""
  global _pillow_readers, _pillow_saved_limit
  with _pillow_lock:
    if _pillow_readers == 0:
      _pillow_saved_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    _pillow_readers += 1
  try:
    yield
  finally:
    with _pillow_lock:
      _pillow_readers -= 1
      if _pillow_readers == 0:
        Image.MAX_IMAGE_PIXELS = _pillow_saved_limit


@contextlib.contextmanager
def open_image(path, *, max_pixels: int | None = None):
  """`PIL.Image.open` that refuses, from the header alone, an image above the pixel cap; use as a `with` block.

  Pillow's own limit stays off until the block ends, so `image.load()` inside it decodes images up to the cap.

  Args:
    path: an image file.
    max_pixels: this read's cap; None uses the process-wide one (`set_max_pixels`).

  Yields:
    The open (not yet decoded) `PIL.Image.Image`, closed when the block ends.

  Raises:
    DataError: the header declares an empty image, or an image or TIFF tile of more pixels than the cap.
    OSError and whatever else `PIL.Image.open` raises for a file it cannot identify or a damaged header.
  """
  cap = _cap(max_pixels)
  with _pillow_limit_off(), Image.open(path) as image:
    check_pixels(path, *image.size, max_pixels=cap)
    if image.format == "TIFF":
      check_tiff_tiles(path, max_pixels=cap)
    _check_data_offsets(image, os.path.getsize(path))
    yield image


def _check_data_offsets(image: Image.Image, size: int) -> None:
  """Raises OSError, as Pillow does for a damaged file, when the header places pixel data outside the file: Pillow
  would seek to a non-integer offset (TypeError) or size a read by the gap to a far offset (MemoryError)."""
  for tile in image.tile:
    if not isinstance(tile.offset, numbers.Integral) or not 0 <= tile.offset <= size:
      raise OSError(f"the header places pixel data at byte {tile.offset}, outside the file's {size} bytes")


def read_gray(path, *, max_pixels: int | None = None) -> np.ndarray:
  """Reads an 8-bit gray image (1 channel, or RGB/RGBA with equal channels and no transparency).

  Args:
    path: an image file Pillow or tifffile can read (PNG, TIFF, ...).
    max_pixels: this read's pixel cap; None uses the process-wide one (`set_max_pixels`, default 2^28).

  Returns:
    uint8 [H, W].

  Raises:
    MissingDataError: the file does not exist.
    DataError: the file is corrupt, not 8-bit, not gray, or declares more pixels than the cap.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise MissingDataError(f"image file {path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
  cap = _cap(max_pixels)
  try:
    return _read_with_pillow(path, cap)
  except _PillowFailed as pillow_error:
    if path.suffix.lower() not in _TIFF_SUFFIXES and not is_tiff(path):
      raise DataError(f"cannot read {path}: {pillow_error}. The file is corrupt, truncated or not an image; "
                      "replace it with an intact copy.") from None
    # tifffile reads TIFF variants Pillow does not (BigTIFF, some compressions).
    return _read_with_tifffile(path, pillow_error, cap)


def check_tiff_pages(path, *, max_pages: int = MAX_TIFF_PAGES) -> int:
  """Walks a TIFF's chain of pages (IFDs) from the header and returns how many there are, before tifffile does.

  tifffile follows the chain page by page when it builds its series, and its loop check does not run on that path:
  a damaged next-page offset that points back at an earlier page makes it parse pages forever. A chain of many
  tiny pages would make it build one page object each (a page bomb). Stops where tifffile stops (offset 0, past the
  end, an unreadable or oversized tag count). Returns 0 for a file that is not a TIFF.

  Raises:
    DataError: the chain loops, or holds more than `max_pages` pages.
  """
  with open(path, "rb") as f:
    header = _TiffHeader.read(f)
    if header is None:
      return 0
    offset, seen = header.first_ifd, set()
    while 0 < offset < header.size:
      if offset in seen:
        raise DataError(f"{path} is a damaged TIFF: its chain of pages loops back to the page at byte {offset}. "
                        "Replace it with an intact copy.")
      if len(seen) == max_pages:
        raise DataError(f"{path} holds more than {max_pages} TIFF pages; the image readers take single images. "
                        "Save the image you mean as a TIFF of its own.")
      seen.add(offset)
      tags = header.tag_count(f, offset)
      if tags is None:
        break
      offset = header.unpack(f, offset + header.count_size + tags * header.entry_size, header.offset_format)
      if offset is None:
        break
  return len(seen)


def check_tiff_tiles(path, *, max_pixels: int | None = None) -> None:
  """Refuses a TIFF whose first page declares tiles of more pixels than the cap, read from the file's own bytes.

  libtiff (Pillow's TIFF decoder) decodes each tile into a buffer of the declared tile size, whatever the image's
  size: a 31 x 24 image with 32768 x 32768 tiles takes 1 GB. Pillow's own tag parser can skip tags that libtiff
  then reads (after a damaged tag), so the tags are read here, the way libtiff reads them: the first TileWidth
  (322) and TileLength (323) entry, an integer of count 1.
  """
  with open(path, "rb") as f:
    header = _TiffHeader.read(f)
    if header is None or not 0 < header.first_ifd < header.size:
      return
    tags = header.tag_count(f, header.first_ifd) or 0
    tile = {}
    for entry in range(tags):
      at = header.first_ifd + header.count_size + entry * header.entry_size
      fields = header.unpack(f, at, "HH" + header.offset_format)  # tag, type, count (as wide as an offset)
      if fields is None:
        break
      tag, kind, count = fields
      if tag in (322, 323) and tag not in tile and count == 1 and kind in _TIFF_INTEGER_FORMATS:
        value_format = _TIFF_INTEGER_FORMATS[kind]
        value_at = at + 4 + header.offset_size
        if struct.calcsize(value_format) > header.offset_size:  # a LONG8 in a classic TIFF lies elsewhere
          value_at = header.unpack(f, value_at, header.offset_format)
        value = None if value_at is None else header.unpack(f, value_at, value_format)
        if value is not None and value >= 0:
          tile[tag] = value
  if len(tile) == 2:
    check_pixels(path, tile[322], tile[323], max_pixels=max_pixels, what="tile")


# TIFF integer field types: BYTE, SHORT, LONG, SBYTE, SSHORT, SLONG, IFD, LONG8, SLONG8, IFD8.
_TIFF_INTEGER_FORMATS = {1: "B", 3: "H", 4: "I", 6: "b", 8: "h", 9: "i", 13: "I", 16: "Q", 17: "q", 18: "Q"}


class _TiffHeader:
  """Byte order, size and field layout of a classic TIFF or a BigTIFF, for reading its pages' tag lists."""

  def __init__(self, order: str, big: bool, first_ifd: int, size: int):
    self.order, self.first_ifd, self.size = order, first_ifd, size
    self.count_format, self.entry_size, self.offset_format = ("Q", 20, "Q") if big else ("H", 12, "I")
    self.count_size, self.offset_size = (8, 8) if big else (2, 4)

  @classmethod
  def read(cls, f) -> "_TiffHeader | None":
    head = f.read(16)
    order = {b"II": "<", b"MM": ">"}.get(head[:2])
    if order is None or len(head) < 8:
      return None
    version = struct.unpack(order + "H", head[2:4])[0]
    size = os.fstat(f.fileno()).st_size
    if version == 42:
      return cls(order, False, struct.unpack(order + "I", head[4:8])[0], size)
    if version == 43 and len(head) == 16:
      return cls(order, True, struct.unpack(order + "Q", head[8:16])[0], size)
    return None

  def unpack(self, f, at: int, fields: str):
    """The value(s) of `fields` at byte `at`, or None where the file ends first."""
    f.seek(at)
    size = struct.calcsize(self.order + fields)
    raw = f.read(size)
    if len(raw) < size:
      return None
    values = struct.unpack(self.order + fields, raw)
    return values[0] if len(values) == 1 else values

  def tag_count(self, f, offset: int) -> int | None:
    """The number of tags of the page at `offset`, or None where it is unreadable or oversized (as tifffile)."""
    tags = self.unpack(f, offset, self.count_format)
    return None if tags is None or tags > 4096 else tags


def is_tiff(path) -> bool:
  """Whether the file starts like a TIFF (classic or BigTIFF), whatever its suffix."""
  try:
    with open(path, "rb") as f:
      return f.read(4) in _TIFF_MAGIC
  except OSError:
    return False


class _PillowFailed(Exception):
  pass


def _read_with_pillow(path: pathlib.Path, cap: int) -> np.ndarray:
  try:
    with open_image(path, max_pixels=cap) as image:
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


def _read_with_tifffile(path: pathlib.Path, pillow_error: Exception, cap: int) -> np.ndarray:
  import tifffile  # pylint: disable=g-import-not-at-top

  try:
    check_tiff_pages(path)
    with tifffile.TiffFile(path) as tif:
      if not tif.series:
        raise DataError(f"{path} holds no image (a TIFF without pages); replace it with an intact copy.")
      # tifffile allocates the series' shape before decoding: check the header's dtype, shape and size first.
      series = tif.series[0]
      _check_gray_layout(path, tuple(series.shape), series.dtype)
      check_pixels(path, series.shape[1], series.shape[0], max_pixels=cap)
      check_tiff_tiles(path, max_pixels=cap)
      array = tif.asarray()  # what tifffile.imread reads: the first series
  except DataError:
    raise
  except Exception as e:  # tifffile raises many types for corrupt input  # pylint: disable=broad-except
    raise DataError(f"cannot read {path}: {pillow_error} (tifffile: {e}). The file is corrupt, truncated or not a "
                    "TIFF image; replace it with an intact copy.") from None
  _check_gray_layout(path, array.shape, array.dtype)
  if array.ndim == 2:
    return array
  bands = [array[..., c] for c in range(array.shape[-1])]
  return _equal_channels_to_gray(bands, path, has_alpha=array.shape[-1] in (2, 4))


def _check_gray_layout(path: pathlib.Path, shape: tuple[int, ...], dtype) -> None:
  """Refuses what tifffile would return that is not uint8 [H, W] or [H, W, 2-4] (gray or RGB, maybe with alpha)."""
  if dtype != np.uint8:
    raise DataError(f"{path} holds {dtype} pixels; this project reads 8-bit gray only. Convert it to uint8.")
  if len(shape) != 2 and not (len(shape) == 3 and shape[-1] in (2, 3, 4)):
    raise DataError(f"{path} holds an array of shape {shape}; expected one 2-D gray image. Save a single page.")


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
