"""A catalogue of bad image files, each read by both image readers: the training/predict reader `imageio.read_gray`
and the official scorer's `f1.read_gray8`. Every refusal must be the documented error class and name the file, so a
user with thousands of images knows which one to replace; decompression bombs must be refused from the header,
before anything is decoded.
"""

import dataclasses
import io
import json
import pathlib
import struct
import subprocess
import sys
import threading
import zlib
from collections.abc import Callable

import numpy as np
import pytest
import tifffile
from PIL import Image

from urisc_jax.data import imageio
from urisc_jax.evaluation import f1 as f1_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
BOMB_SIDE = 20000  # 400 Mpix: above the default cap of 2^28 = 268 Mpix, in a file of ~390 KB


@pytest.fixture(autouse=True)
def restore_cap():
  """Every test starts from, and leaves, the default process-wide cap."""
  previous = imageio.set_max_pixels(None)
  yield
  imageio.set_max_pixels(previous)


def zeros_zlib(n: int, block: int = 1 << 22) -> bytes:
  """A zlib stream of n zero bytes without ever holding them: full-flush segments are byte-aligned and reset the
  compressor, so one compressed block can be repeated; the trailer's Adler-32 of n zeros is (n mod 65521) << 16 | 1."""
  compressor = zlib.compressobj(9)
  head = compressor.compress(bytes(block)) + compressor.flush(zlib.Z_FULL_FLUSH)
  segment = compressor.compress(bytes(block)) + compressor.flush(zlib.Z_FULL_FLUSH)
  assert head[2:] == segment
  full, rest = divmod(n, block)
  tail = zlib.compressobj(9, zlib.DEFLATED, -15)
  last = tail.compress(bytes(rest)) + tail.flush()
  return head[:2] + segment * full + last + ((n % 65521) << 16 | 1).to_bytes(4, "big")


def _chunk(kind: bytes, data: bytes) -> bytes:
  return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def gray_png_bytes(width: int, height: int, idat: bytes | None = None) -> bytes:
  """An 8-bit gray PNG of zeros (filter 0 on every row); the whole image stream is zeros_zlib."""
  idat = zeros_zlib((width + 1) * height) if idat is None else idat
  ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
  return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def gray_tiff_bytes(width: int, height: int, strip: bytes | None = None) -> bytes:
  """A little-endian 8-bit gray TIFF with one deflate strip of zeros (or `strip`, for a truncated one)."""
  strip = zeros_zlib(width * height) if strip is None else strip
  tags = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 8), (262, 3, 1), (273, 4, None), (277, 3, 1),
          (278, 4, height), (279, 4, len(strip))]
  strip_offset = 8 + 2 + 12 * len(tags) + 4
  ifd = struct.pack("<H", len(tags))
  for tag, kind, value in tags:
    value = strip_offset if value is None else value
    ifd += struct.pack("<HHI", tag, kind, 1) + (struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value))
  return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + strip


def with_more_pages(tiff: bytes, pages: int, *, loop: bool = False) -> bytes:
  """`tiff` (from gray_tiff_bytes) followed by a chain of `pages` empty pages (IFDs of 0 tags), whose last one points
  back at the first page when `loop`."""
  next_at = 8 + 2 + 12 * 9  # the first IFD's next-page offset
  data = bytearray(tiff)
  data[next_at:next_at + 4] = struct.pack("<I", len(data) if pages else (8 if loop else 0))
  for page in range(pages):
    last = page == pages - 1
    data += struct.pack("<HI", 0, (8 if loop else 0) if last else len(data) + 6)
  return bytes(data)


def _gray(shape=(12, 17)) -> np.ndarray:
  return (np.arange(np.prod(shape)) * 7 % 256).astype(np.uint8).reshape(shape)


# Builders: each writes one file (or folder) under tmp_path and returns the path to read.


def png_bomb(tmp_path):
  path = tmp_path / "bomb.png"
  path.write_bytes(gray_png_bytes(BOMB_SIDE, BOMB_SIDE))
  return path


def tiff_bomb(tmp_path):
  path = tmp_path / "bomb.tif"
  path.write_bytes(gray_tiff_bytes(BOMB_SIDE, BOMB_SIDE))
  return path


def tiff_huge_header(tmp_path):
  # 10^10 pixels declared, 1 KB of data: tifffile and Pillow would allocate the full image before failing.
  path = tmp_path / "huge.tiff"
  path.write_bytes(gray_tiff_bytes(100_000, 100_000, strip=zeros_zlib(1000)))
  return path


def png_header_zero_size(tmp_path):
  path = tmp_path / "zero.png"
  path.write_bytes(gray_png_bytes(0, 0, idat=zlib.compress(b"")))
  return path


def tiff_header_zero_size(tmp_path):
  path = tmp_path / "zero.tif"
  path.write_bytes(gray_tiff_bytes(0, 0, strip=zlib.compress(b"")))
  return path


def png_64x64(tmp_path, name="genuine.png"):
  return imageio.write_png(tmp_path / name, _gray((64, 64)))


def empty_file(tmp_path):
  path = tmp_path / "empty.png"
  path.write_bytes(b"")
  return path


def truncated_png(tmp_path):
  data = imageio.write_png(tmp_path / "full.png", _gray((40, 40))).read_bytes()
  path = tmp_path / "truncated.png"
  path.write_bytes(data[:len(data) // 2])
  return path


def truncated_tiff(tmp_path):
  tifffile.imwrite(tmp_path / "full.tif", _gray((40, 40)))  # uncompressed: the cut falls inside the pixel data
  data = (tmp_path / "full.tif").read_bytes()
  path = tmp_path / "truncated.tif"
  path.write_bytes(data[:len(data) // 2])
  return path


def random_bytes_png(tmp_path):
  path = tmp_path / "noise.png"
  path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
  return path


def tiff_named_png(tmp_path):
  path = tmp_path / "really_a_tiff.png"
  tifffile.imwrite(path, _gray())
  return path


def png_named_tif(tmp_path):
  path = tmp_path / "really_a_png.tif"
  path.write_bytes(imageio.write_png(tmp_path / "src.png", _gray()).read_bytes())
  return path


def png_16bit(tmp_path):
  path = tmp_path / "deep.png"
  Image.fromarray(_gray().astype(np.uint16) * 257).save(path)
  return path


def tiff_16bit(tmp_path):
  path = tmp_path / "deep.tif"
  tifffile.imwrite(path, _gray().astype(np.uint16) * 257)
  return path


def png_colour(tmp_path):
  rgb = np.repeat(_gray()[..., None], 3, axis=-1)
  rgb[3, 4, 0] = 255 - rgb[3, 4, 0]
  path = tmp_path / "colour.png"
  Image.fromarray(rgb).save(path)
  return path


def png_transparent_pixel(tmp_path):
  rgba = np.dstack([np.repeat(_gray()[..., None], 3, axis=-1), np.full(_gray().shape, 255, np.uint8)])
  rgba[0, 0, 3] = 0
  path = tmp_path / "transparent.png"
  Image.fromarray(rgba).save(path)
  return path


def folder_named_like_an_image(tmp_path):
  path = tmp_path / "folder.png"
  path.mkdir()
  return path


def missing_file(tmp_path):
  return tmp_path / "missing.tif"


def multipage_tiff(tmp_path):
  # Two pages of equal shape: tifffile sees one [2, H, W] series, Pillow opens page 0.
  path = tmp_path / "stack.tif"
  tifffile.imwrite(path, np.stack([_gray(), 255 - _gray()]))
  return path


def tiff_circular_pages(tmp_path):
  # Intact first page whose chain of pages loops back to it: tifffile would parse pages forever.
  path = tmp_path / "circular.tif"
  path.write_bytes(with_more_pages(gray_tiff_bytes(17, 12, strip=zlib.compress(_gray().tobytes())), 3, loop=True))
  return path


def tiff_page_bomb(tmp_path):
  # 5000 pages of 6 bytes each: tifffile would build an object for every one.
  path = tmp_path / "pages.tif"
  path.write_bytes(with_more_pages(gray_tiff_bytes(17, 12, strip=zlib.compress(_gray().tobytes())), 5000))
  return path


def tiff_tile_bomb(tmp_path):
  # A 17 x 12 image in tiles declared 32768 x 32768: libtiff (through Pillow) decodes each tile into a buffer of the
  # declared size, 1 GB here, whatever the image's size.
  buffer = io.BytesIO()
  tifffile.imwrite(buffer, _gray(), tile=(16, 16), compression="zlib")
  data = bytearray(buffer.getvalue())
  ifd = struct.unpack("<I", data[4:8])[0]
  for entry in range(ifd + 2, ifd + 2 + 12 * struct.unpack("<H", data[ifd:ifd + 2])[0], 12):
    tag, kind = struct.unpack("<HH", data[entry:entry + 4])
    if tag in (322, 323):  # TileWidth, TileLength
      data[entry + 8:entry + 12] = struct.pack("<HH", 32768, 0) if kind == 3 else struct.pack("<I", 32768)
  path = tmp_path / "tiles.tif"
  path.write_bytes(bytes(data))
  return path


def tiff_strip_beyond_file(tmp_path):
  # Uncompressed, its one strip placed at byte 2^31 of a 326-byte file.
  data = bytearray(gray_tiff_bytes(17, 12, strip=bytes(204)))
  data[8 + 2 + 12 * 3 + 8:8 + 2 + 12 * 3 + 10] = struct.pack("<H", 1)  # Compression = none
  data[8 + 2 + 12 * 5 + 8:8 + 2 + 12 * 5 + 12] = struct.pack("<I", 2**31)  # StripOffsets
  path = tmp_path / "far.tif"
  path.write_bytes(bytes(data))
  return path


def bigtiff_tile_beyond_file(tmp_path):
  # Its second tile placed at byte 2^62: Pillow sized a read by the gap from the first tile (MemoryError).
  path = tmp_path / "far_tile.tif"
  tifffile.imwrite(path, _gray(), bigtiff=True, tile=(16, 16))
  with tifffile.TiffFile(path) as tif:
    offsets_at = tif.pages.first.tags["TileOffsets"].valueoffset
  data = bytearray(path.read_bytes())
  data[offsets_at + 8:offsets_at + 16] = struct.pack("<Q", 2**62)
  path.write_bytes(bytes(data))
  return path


def png_bad_header_crc(tmp_path):
  data = bytearray(imageio.write_png(tmp_path / "src.png", _gray()).read_bytes())
  data[29] ^= 0xFF  # the IHDR chunk's CRC: 8 signature + 4 length + 4 type + 13 data bytes in
  path = tmp_path / "bad_crc.png"
  path.write_bytes(bytes(data))
  return path


def png_bad_idat_crc(tmp_path):
  data = bytearray(imageio.write_png(tmp_path / "src.png", _gray()).read_bytes())
  crc_at = data.index(b"IEND") - 8  # the IDAT CRC sits just before IEND's length field
  data[crc_at] ^= 0xFF
  path = tmp_path / "bad_idat_crc.png"
  path.write_bytes(bytes(data))
  return path


def bigtiff(tmp_path):
  path = tmp_path / "big.tif"
  tifffile.imwrite(path, _gray(), bigtiff=True, compression="zlib")
  return path


@dataclasses.dataclass(frozen=True)
class Expect:
  """What one reader does with a case: raise `error` with `fragment` in its message (which must also name the path),
  or, with error None, read uint8 [H, W] equal to `image` when given."""
  error: type[BaseException] | None = None
  fragment: str = ""
  image: np.ndarray | None = None


READS = Expect()
CAP = "config.data.max_image_pixels"


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  build: Callable[[pathlib.Path], pathlib.Path]
  read_gray: Expect
  read_gray8: Expect
  max_pixels: int | None = None  # the per-call cap, None for the process-wide one
  global_cap: int | None = None  # set_max_pixels before the read, None to keep the default


CASES = [
    Case("png_bomb", png_bomb, Expect(imageio.DataError, f"{BOMB_SIDE} x {BOMB_SIDE} image (400,000,000 pixels)"),
         Expect(f1_lib.ImageReadError, f"{BOMB_SIDE} x {BOMB_SIDE}")),
    Case("tiff_bomb", tiff_bomb, Expect(imageio.DataError, CAP), Expect(f1_lib.ImageReadError, CAP)),
    Case("tiff_huge_header", tiff_huge_header, Expect(imageio.DataError, "100000 x 100000"),
         Expect(f1_lib.ImageReadError, "100000 x 100000")),
    Case("png_bomb_per_call_cap_below", png_64x64, Expect(imageio.DataError, "64 x 64 image (4,096 pixels)"),
         Expect(f1_lib.ImageReadError, "limit of 4,095 pixels"), max_pixels=64 * 64 - 1),
    Case("png_exactly_at_per_call_cap", png_64x64, Expect(image=_gray((64, 64))), Expect(image=_gray((64, 64))),
         max_pixels=64 * 64),
    Case("png_above_lowered_global_cap", png_64x64, Expect(imageio.DataError, "set_max_pixels(N)"),
         Expect(f1_lib.ImageReadError, "N >= 4096"), global_cap=4000),
    Case("per_call_cap_raises_lowered_global", png_64x64, Expect(image=_gray((64, 64))),
         Expect(image=_gray((64, 64))), max_pixels=5000, global_cap=4000),
    Case("tiff_tile_bomb", tiff_tile_bomb, Expect(imageio.DataError, "declares a 32768 x 32768 tile"),
         Expect(f1_lib.ImageReadError, "declares a 32768 x 32768 tile")),
    Case("tiff_strip_beyond_file", tiff_strip_beyond_file,
         Expect(imageio.DataError, "pixel data at byte 2147483648, outside the file's 326 bytes"),
         Expect(f1_lib.ImageReadError, "is the file complete")),
    Case("bigtiff_tile_beyond_file", bigtiff_tile_beyond_file,
         Expect(imageio.DataError, "pixel data at byte 4611686018427387904, outside the file's"),
         Expect(f1_lib.ImageReadError, "is the file complete")),
    Case("png_zero_size_header", png_header_zero_size, Expect(imageio.DataError, "cannot read"),
         Expect(f1_lib.ImageReadError, "cannot be read")),
    Case("tiff_zero_size_header", tiff_header_zero_size, Expect(imageio.DataError, "0 x 0 image, which holds no"),
         Expect(f1_lib.ImageReadError, "0 x 0 image, which holds no")),
    Case("empty_file", empty_file, Expect(imageio.DataError, "cannot read"),
         Expect(f1_lib.ImageReadError, "cannot be read")),
    Case("truncated_png", truncated_png, Expect(imageio.DataError, "truncated"),
         Expect(f1_lib.ImageReadError, "is the file complete")),
    Case("truncated_tiff", truncated_tiff, Expect(imageio.DataError, "corrupt, truncated"),
         Expect(f1_lib.ImageReadError, "is the file complete")),
    Case("random_bytes_png", random_bytes_png, Expect(imageio.DataError, "not an image"),
         Expect(f1_lib.ImageReadError, "cannot be read")),
    Case("tiff_named_png", tiff_named_png, Expect(image=_gray()), Expect(image=_gray())),
    Case("png_named_tif", png_named_tif, Expect(image=_gray()), Expect(image=_gray())),
    Case("png_16bit", png_16bit, Expect(imageio.DataError, "16-bit image"),
         Expect(f1_lib.ImageReadError, "16-bit / float images are not accepted")),
    Case("tiff_16bit", tiff_16bit, Expect(imageio.DataError, "16-bit image"),
         Expect(f1_lib.ImageReadError, "got dtype uint16")),
    Case("png_colour", png_colour, Expect(imageio.DataError, "colour image: channel 1 differs"),
         Expect(f1_lib.ImageReadError, "unequal R, G, B")),
    # The scorer ignores alpha, as the official one does; training data must be opaque.
    Case("png_transparent_pixel", png_transparent_pixel, Expect(imageio.DataError, "transparent pixels"),
         Expect(image=_gray())),
    Case("folder_named_like_an_image", folder_named_like_an_image,
         Expect(imageio.MissingDataError, "(it is a folder)"), Expect(FileNotFoundError, "(it is a folder)")),
    Case("missing_file", missing_file, Expect(imageio.MissingDataError, "does not exist"),
         Expect(FileNotFoundError, "no such image file")),
    # Pillow reads the first page; the scorer refuses a stack, as its docstring says.
    Case("multipage_tiff", multipage_tiff, Expect(image=_gray()),
         Expect(f1_lib.ImageReadError, "got shape (2, 12, 17)")),
    # Pillow opens the first page only; the scorer's tifffile would loop, or build 5000 pages, and refuses first.
    Case("tiff_circular_pages", tiff_circular_pages, Expect(image=_gray()),
         Expect(f1_lib.ImageReadError, "chain of pages loops back to the page at byte 8")),
    Case("tiff_page_bomb", tiff_page_bomb, Expect(image=_gray()),
         Expect(f1_lib.ImageReadError, f"more than {imageio.MAX_TIFF_PAGES} TIFF pages")),
    Case("png_bad_header_crc", png_bad_header_crc, Expect(imageio.DataError, "cannot identify image file"),
         Expect(f1_lib.ImageReadError, "cannot identify image file")),
    # Pillow checks the CRC of header chunks only; the pixels of a flipped IDAT CRC are intact and read.
    Case("png_bad_idat_crc", png_bad_idat_crc, Expect(image=_gray()), Expect(image=_gray())),
    Case("bigtiff", bigtiff, Expect(image=_gray()), Expect(image=_gray())),
]

READERS = {"read_gray": imageio.read_gray, "read_gray8": f1_lib.read_gray8}


def _check(expect: Expect, read: Callable[[], np.ndarray], path: pathlib.Path) -> None:
  if expect.error is None:
    image = read()
    assert image.dtype == np.uint8 and image.ndim == 2
    if expect.image is not None:
      np.testing.assert_array_equal(image, expect.image)
    return
  with pytest.raises(Exception) as caught:
    read()
  assert type(caught.value) is expect.error, f"{type(caught.value).__name__}: {caught.value}"
  message = str(caught.value)
  assert str(path) in message, message
  assert expect.fragment in message, message


@pytest.mark.parametrize("reader", sorted(READERS))
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_catalogue(case, reader, tmp_path):
  path = case.build(tmp_path)
  if case.global_cap is not None:
    imageio.set_max_pixels(case.global_cap)
  kwargs = {} if case.max_pixels is None else {"max_pixels": case.max_pixels}
  _check(getattr(case, reader), lambda: READERS[reader](path, **kwargs), path)


def test_catalogue_is_large_enough():
  assert len(CASES) >= 14
  assert len({case.name for case in CASES}) == len(CASES)


def test_bombs_are_bombs(tmp_path):
  """The bomb files are small, and stock Pillow (with its own default limit) refuses them too."""
  for build in (png_bomb, tiff_bomb):
    path = build(tmp_path)
    assert path.stat().st_size < 400_000
    with pytest.raises(Image.DecompressionBombError):
      Image.open(path)


def test_bomb_message_says_how_to_raise_the_cap(tmp_path):
  path = png_bomb(tmp_path)
  with pytest.raises(imageio.DataError) as caught:
    imageio.read_gray(path)
  message = str(caught.value)
  for fragment in (str(path), "20000 x 20000", "400,000,000 pixels", f"limit of {imageio.DEFAULT_MAX_PIXELS:,}",
                   "--config.data.max_image_pixels=N (or urisc_jax.data.imageio.set_max_pixels(N)) if the image is "
                   "genuine", "N >= 400000000"):
    assert fragment in message, message


# Peak memory is VmHWM where /proc has it: ru_maxrss also counts the (pytest) process the child was forked from.
_BOMB_CHILD = """
import json, resource, sys
from urisc_jax.data import imageio
from urisc_jax.evaluation import f1
def peak_kb():
  try:
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1])
  except OSError:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
baseline = peak_kb()
refused = []
for path in sys.argv[1:]:
  for read, error in ((imageio.read_gray, imageio.DataError), (f1.read_gray8, f1.ImageReadError)):
    try:
      read(path)
    except error as e:
      refused.append("max_image_pixels" in str(e))
print(json.dumps({"baseline_kb": baseline, "peak_kb": peak_kb(),
                  "refused": refused}))
"""


def test_bombs_are_refused_before_decoding(tmp_path):
  """Peak memory of a process that reads the bombs with both readers: decoding any would take >= 400 MB (the uint8
  image alone; 1.2 GB as Pillow decodes the PNG, 1 GB for the tile buffer). Measured on Linux: ~85 MB after imports,
  and no growth."""
  paths = [png_bomb(tmp_path), tiff_bomb(tmp_path), tiff_huge_header(tmp_path), tiff_tile_bomb(tmp_path)]
  result = subprocess.run([sys.executable, "-c", _BOMB_CHILD, *map(str, paths)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120, check=True)
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report["refused"] == [True] * 8
  assert report["peak_kb"] - report["baseline_kb"] < 50 * 1024, report


def test_set_max_pixels_validates_and_returns_the_previous_cap():
  assert imageio.max_pixels() == imageio.DEFAULT_MAX_PIXELS == 2**28
  assert imageio.set_max_pixels(30000 * 30000) == imageio.DEFAULT_MAX_PIXELS
  assert imageio.max_pixels() == 900_000_000
  assert imageio.set_max_pixels(None) == 900_000_000
  assert imageio.max_pixels() == imageio.DEFAULT_MAX_PIXELS
  for bad in (0, -1, 1.5, True, "1000", float("inf")):
    with pytest.raises(ValueError, match="config.data.max_image_pixels must be a positive whole number"):
      imageio.set_max_pixels(bad)
  assert imageio.max_pixels() == imageio.DEFAULT_MAX_PIXELS
  with pytest.raises(ValueError, match="max_pixels must be a positive whole number"):
    imageio.check_pixels("x.png", 4, 4, max_pixels=0)
  # numpy integers (e.g. from a config) are whole numbers too.
  imageio.set_max_pixels(np.int64(1 << 30))
  assert imageio.max_pixels() == 1 << 30 and type(imageio.max_pixels()) is int


def test_real_image_sizes_against_the_default_cap():
  imageio.check_pixels("urisc_track1.png", 9958, 9959)  # 99 Mpix, U-RISC Track 1
  imageio.check_pixels("16k.png", 16384, 16384)  # exactly 2^28
  with pytest.raises(imageio.DataError, match="30000 x 30000"):
    imageio.check_pixels("30k.png", 30000, 30000)
  imageio.check_pixels("30k.png", 30000, 30000, max_pixels=30000 * 30000)


def test_pillow_limit_is_restored_after_reads(tmp_path):
  """The readers switch Pillow's own bomb check off while they run, also from several threads at once, and put the
  user's setting back afterwards, whether the read succeeded or not."""
  good = png_64x64(tmp_path)
  bomb = png_bomb(tmp_path)
  before = Image.MAX_IMAGE_PIXELS
  errors = []

  def read_many():
    for _ in range(20):
      try:
        imageio.read_gray(good)
        f1_lib.read_gray8(good)
        imageio.read_gray(bomb)
      except imageio.DataError:
        pass
      except Exception as e:  # pylint: disable=broad-except
        errors.append(e)

  threads = [threading.Thread(target=read_many) for _ in range(4)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  assert not errors
  assert Image.MAX_IMAGE_PIXELS == before
  with imageio.open_image(good) as image:
    assert Image.MAX_IMAGE_PIXELS is None and image.size == (64, 64)
  assert Image.MAX_IMAGE_PIXELS == before


def test_tiff_above_pillows_limit_but_under_the_cap_reads(tmp_path):
  """A 14000 x 14000 TIFF (196 Mpix) is above the 179 Mpix where Pillow's own check fails, which TIFF decoding
  repeats at load time; under the project's cap it reads. Written as a bomb of zeros, so it takes ~200 KB on disk
  (and ~200 MB, twice, in memory while read)."""
  path = tmp_path / "large.png"  # a TIFF under a .png name goes through Pillow in both readers
  path.write_bytes(gray_tiff_bytes(14000, 14000))
  for read in (imageio.read_gray, f1_lib.read_gray8):
    image = read(path)
    assert image.shape == (14000, 14000) and not image.any()
    del image


def test_tiff_page_chains_reach_tifffile_only_when_short(tmp_path):
  """The page walk that guards tifffile counts what tifffile would follow, and refuses loops and page bombs also in
  read_gray's tifffile fallback (a TIFF Pillow cannot open)."""
  one = gray_tiff_bytes(17, 12, strip=zlib.compress(_gray().tobytes()))
  for pages, loop, expected in ((0, False, 1), (3, False, 4), (imageio.MAX_TIFF_PAGES - 1, False, 1024)):
    path = tmp_path / "chain.tif"
    path.write_bytes(with_more_pages(one, pages, loop=loop))
    assert imageio.check_tiff_pages(path) == expected
  path.write_bytes(with_more_pages(one, 1, loop=True))
  with pytest.raises(imageio.DataError, match="loops back"):
    imageio.check_tiff_pages(path)
  assert imageio.check_tiff_pages(png_64x64(tmp_path)) == 0  # not a TIFF: left to the reader
  # BigTIFF, written by tifffile: one page.
  assert imageio.check_tiff_pages(bigtiff(tmp_path)) == 1
  # Pillow refuses a photometric it does not know, so read_gray falls back to tifffile, behind the page walk.
  data = bytearray(with_more_pages(one, 2, loop=True))
  data[8 + 2 + 12 * 4 + 8:8 + 2 + 12 * 4 + 10] = struct.pack("<H", 99)  # PhotometricInterpretation = 99
  path.write_bytes(bytes(data))
  with pytest.raises(imageio.DataError, match="chain.tif is a damaged TIFF: its chain of pages loops back"):
    imageio.read_gray(path)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # Pillow on a big-endian BigTIFF, before tifffile reads it
@pytest.mark.parametrize("layout", [{}, {"bigtiff": True}, {"byteorder": ">"}, {"bigtiff": True, "byteorder": ">"}],
                         ids=["classic", "bigtiff", "big_endian", "big_endian_bigtiff"])
def test_tile_size_is_read_from_the_file(layout, tmp_path):
  path = tmp_path / "tiled.tif"
  tifffile.imwrite(path, _gray(), tile=(48, 32), compression="zlib", **layout)  # (length, width)
  imageio.check_tiff_tiles(path, max_pixels=32 * 48)
  with pytest.raises(imageio.DataError, match="declares a 32 x 48 tile"):
    imageio.check_tiff_tiles(path, max_pixels=32 * 48 - 1)
  for read in (imageio.read_gray, f1_lib.read_gray8):
    np.testing.assert_array_equal(read(path, max_pixels=32 * 48), _gray())
    with pytest.raises(ValueError, match="tiled.tif declares a 32 x 48 tile"):
      read(path, max_pixels=32 * 48 - 1)
  tifffile.imwrite(path, _gray(), **layout)  # strips: no tiles to check
  imageio.check_tiff_tiles(path, max_pixels=1)


def test_hand_made_files_decode():
  """The hand-made PNG and TIFF writers used above produce files both libraries decode."""
  png = gray_png_bytes(7, 5)
  assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), np.zeros((5, 7), np.uint8))
  tiff = gray_tiff_bytes(7, 5)
  assert np.array_equal(tifffile.imread(io.BytesIO(tiff)), np.zeros((5, 7), np.uint8))
