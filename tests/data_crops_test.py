"""Tile grids cover every pixel, stay inside the image and end flush with the border."""

import numpy as np
import pytest

from urisc_jax.data import crops


@pytest.mark.parametrize("length,tile,stride", [(1000, 256, 128), (9959, 1024, 512), (512, 512, 256), (100, 128, 64),
                                                (1025, 1024, 512), (700, 64, 64)])
def test_tile_starts_cover_the_axis_flush_with_the_border(length, tile, stride):
  starts = crops.tile_starts(length, tile, stride)
  covered = np.zeros(max(length, tile), bool)
  for s in starts:
    covered[s:s + tile] = True
  assert covered[:length].all()
  assert starts[0] == 0 and starts == sorted(set(starts))
  assert starts[-1] == max(length - tile, 0)
  assert all(b - a <= stride for a, b in zip(starts, starts[1:]))


def test_tile_starts_rejects_bad_strides():
  with pytest.raises(ValueError, match="stride"):
    crops.tile_starts(100, 32, 0)
  with pytest.raises(ValueError, match="stride"):
    crops.tile_starts(100, 32, 33)


def test_random_origins_stay_inside_and_reach_both_borders():
  rng = np.random.default_rng(0)
  origins = np.array([crops.random_origin(rng, (40, 30), 16) for _ in range(2000)])
  assert origins.min() == 0
  assert origins[:, 0].max() == 24 and origins[:, 1].max() == 14


def test_random_origin_rejects_crops_larger_than_the_image():
  with pytest.raises(ValueError, match="crop_size"):
    crops.random_origin(np.random.default_rng(0), (40, 30), 32)


def test_default_grid_on_a_track1_image():
  origins = crops.grid_origins((9959, 9958))
  rows = sorted({r for r, _ in origins})
  cols = sorted({c for _, c in origins})
  assert len(rows) == len(cols) == 19 and len(origins) == 19 * 19
  assert rows[:3] == [0, 512, 1024] and rows[-1] == 9959 - 1024 and cols[-1] == 9958 - 1024
