"""Where crops and tiles sit in an image: overlapping grids with the last tile flush with the border, random origins.

Training crops and inference tiles share `tile_starts`, so both cover an image the same way. The defaults are the
paper's: 1024 x 1024 patches at stride 512 (19 x 19 patches on a 9959 x 9958 U-RISC Track 1 image).
"""

import numpy as np

DEFAULT_TILE = 1024
DEFAULT_STRIDE = 512


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
  """Start offsets of tiles of size `tile` every `stride` pixels along an axis of `length` pixels.

  The last tile is flush with the border (start = length - tile), so every pixel is covered and no tile leaves the
  image. An axis shorter than the tile gets one tile at 0 (the caller pads).

  Args:
    length: axis length in pixels.
    tile: tile size in pixels.
    stride: distance between consecutive starts, 0 < stride <= tile.

  Returns:
    Sorted, distinct start offsets.
  """
  if not 0 < stride <= tile:
    raise ValueError(f"stride must be in (0, tile={tile}], got {stride}.")
  if length <= tile:
    return [0]
  starts = list(range(0, length - tile, stride))
  starts.append(length - tile)
  return starts


def grid_origins(shape: tuple[int, int], tile: int = DEFAULT_TILE,
                 stride: int = DEFAULT_STRIDE) -> list[tuple[int, int]]:
  """All (row, col) origins of an overlapping tile grid over an image of `shape` (row-major order)."""
  rows = tile_starts(shape[0], tile, stride)
  cols = tile_starts(shape[1], tile, stride)
  return [(r, c) for r in rows for c in cols]


def random_origin(rng: np.random.Generator, shape: tuple[int, int], crop: int) -> tuple[int, int]:
  """A uniformly random (row, col) origin of a `crop` x `crop` window inside an image of `shape`."""
  if shape[0] < crop or shape[1] < crop:
    raise ValueError(f"Crop size {crop} is larger than an image of {shape[0]} x {shape[1]} px: lower "
                     "config.data.crop_size.")
  return int(rng.integers(0, shape[0] - crop + 1)), int(rng.integers(0, shape[1] - crop + 1))
