"""Volume inputs that are not what they seem are refused with one line naming the file and the fix, and narrow
sections are tiled in linear time: the read side of blockwise volume prediction.

Each case builds a small input the way a careless or unlucky user could (an RGB stack, an Angstrom pixel size,
garbled OME-Zarr metadata, an empty array, a stray `info` file among images, a dataset path leaving the group, a
section a few pixels high) and calls the library function the prediction calls.
"""

import json
import pathlib

import ml_collections
import numpy as np
import pytest
import tensorstore as ts

from urisc_jax import blockwise, inference, volumes


def _create(path: pathlib.Path, data: np.ndarray, *, driver: str = "zarr") -> None:
  if driver == "zarr":
    spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(path)},
            "metadata": {"shape": list(data.shape), "chunks": [max(1, min(n, 32)) for n in data.shape],
                         "dtype": "|u1"}}
  else:
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)},
            "metadata": {"shape": list(data.shape), "data_type": "uint8",
                         "chunk_grid": {"name": "regular",
                                        "configuration": {"chunk_shape": [max(1, min(n, 32)) for n in data.shape]}}}}
  store = ts.open(spec, create=True).result()
  if data.size:
    store.write(data).result()


# --- sections narrower than a tile -----------------------------------------------------------------------------------


def _box_forward(tiles):
  """A stand-in network with a 5 px receptive field (integer box sums: exact, no rounding)."""
  k = 11
  x = np.pad(np.asarray(tiles[..., 0], np.int64), [(0, 0), (6, 5), (6, 5)])
  c = x.cumsum(1).cumsum(2)
  return (c[:, k:, k:] - c[:, :-k, k:] - c[:, k:, :-k] + c[:, :-k, :-k]).astype(np.float32) / 1024


@pytest.mark.parametrize("halo", [16, None], ids=["halo", "blended"])
@pytest.mark.parametrize("shape", [(8, 5000), (5000, 8), (1, 3000)])
def test_a_section_narrower_than_a_tile_costs_tiles_linear_in_its_length(shape, halo):
  config = ml_collections.ConfigDict({"tile": 64, "step": 0.5, "blend": "gaussian", "halo": halo, "batch_size": 4})
  image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
  tiles = []

  def forward(batch):
    tiles.append(len(batch))
    return _box_forward(batch)

  plan = blockwise.section_plan(shape, config)
  whole = inference.predict_logits(forward, image, tile=plan.tile, step=0.5, blend="gaussian", batch_size=4,
                                   halo=halo)
  whole_tiles, tiles[:] = sum(tiles), []
  out = np.full(shape, np.nan, np.float32)
  blocks = blockwise.block_grid(shape, 256, chunk=32)
  for b in blocks:
    out[b.top:b.bottom, b.left:b.right] = blockwise.predict_block_logits(forward, lambda r, c: image[r, c], plan, b)
  np.testing.assert_array_equal(out, whole)
  # Each block computes the tiles reaching into it (at most 256 / stride + 2 per axis, batches padded to 4), not the
  # whole section's: before, 20 blocks of an 8 x 5000 section computed 20 x 160 tiles.
  per_block = 4 * -(-(256 // 32 + 3) // 4)
  assert sum(tiles) <= len(blocks) * per_block, (sum(tiles), whole_tiles, len(blocks))
  assert sum(tiles) <= 2 * whole_tiles + 4 * len(blocks), (sum(tiles), whole_tiles)
