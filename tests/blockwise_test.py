"""Blockwise prediction: any block computed alone equals that block of the whole-image prediction, bit for bit,
whatever the block size and the order in which blocks run (halo and blended tiles alike).

Checked against two independent references: `inference.predict_logits` on the whole image (with an exact integer
stand-in network whose receptive field is known, and with a narrow real LinkNet) and, for the stand-in, the
closed-form box sum of the whole image where tiles see far enough.
"""

import itertools

import ml_collections
import numpy as np
import pytest

from urisc_jax import blockwise, inference
from urisc_jax import predict as predict_lib

RADIUS = 5


def _box_forward(tiles):
  """A 'network' with a receptive field of exactly RADIUS px and zero padding: integer box sums, no rounding."""
  k = 2 * RADIUS + 1
  x = np.pad(np.asarray(tiles[..., 0], np.int64), [(0, 0), (RADIUS + 1, RADIUS), (RADIUS + 1, RADIUS)])
  c = x.cumsum(1).cumsum(2)
  return (c[:, k:, k:] - c[:, :-k, k:] - c[:, k:, :-k] + c[:, :-k, :-k]).astype(np.float32) / 1024


def _config(halo, tile=64, batch_size=3):
  return ml_collections.ConfigDict({"tile": tile, "step": 0.5, "blend": "gaussian", "halo": halo,
                                    "batch_size": batch_size})


def _assemble(forward, image, config, block, *, order=1):
  plan = blockwise.section_plan(image.shape, config)
  out = np.full(image.shape, np.nan, np.float32)
  for b in blockwise.block_grid(image.shape, block, chunk=32)[::order]:
    out[b.top:b.bottom, b.left:b.right] = blockwise.predict_block_logits(forward, lambda r, c: image[r, c], plan, b)
  return out


@pytest.fixture(scope="module")
def image():
  return np.random.default_rng(0).integers(0, 256, (230, 301), dtype=np.uint8)


@pytest.mark.parametrize("halo", [16, None], ids=["halo", "blended"])
def test_blocks_equal_the_whole_image_whatever_their_size_and_order(image, halo):
  config = _config(halo)
  tile = predict_lib.tile_size(image.shape, config)
  whole = inference.predict_logits(_box_forward, image, tile=tile, step=0.5, blend="gaussian", batch_size=3,
                                   halo=halo)
  for block, order in itertools.product((32, 64, 96, 512), (1, -1)):
    np.testing.assert_array_equal(_assemble(_box_forward, image, config, block, order=order), whole,
                                  err_msg=f"block {block}, order {order}")
  if halo is not None:  # every pixel lies >= halo > RADIUS from its tile's border: the exact box sum of the image
    np.testing.assert_array_equal(whole, _box_forward(image[None, ..., None])[0])


def test_a_section_smaller_than_a_tile_is_predicted_whole(image):
  small = image[:40, :50]
  config = _config(None, tile=64)
  whole = inference.predict_logits(_box_forward, small, tile=64, step=0.5, blend="gaussian", batch_size=3)
  np.testing.assert_array_equal(_assemble(_box_forward, small, config, 32), whole)


@pytest.mark.numerics
def test_blocks_of_a_real_network_equal_predict_probabilities():
  """Blocks of a real network equal whole-section prediction to float32 rounding.

  The assembly is exact (the stand-in tests above, bit for bit); what can differ is the network itself: a block
  batches each tile with other partners than whole-section prediction does, and XLA:CPU does not promise that one
  batch element's result is independent of the others' (vector lanes and tails). Measured: equal bit for bit on two
  cores; on one core (taskset -c 0, AVX2 or SSE4_2) 1 pixel of 126,000 one float32 ulp (6e-8) apart in blended mode.
  4 ulps of 1.0 (2.4e-7) covers that on any CPU; a misplaced tile, a wrong weight or halo moves probabilities by far
  more (the box-network tests catch any assembly error exactly)."""
  from urisc_jax import models  # pylint: disable=g-import-not-at-top
  model = models.build("linknet", encoder="resnet18", in_channels=1, num_classes=1, width=1 / 16)
  forward = inference.make_tile_forward(model, models.init_variables(model, (1, 64, 64, 1)), mean=0.5, std=0.2)
  image = np.random.default_rng(1).integers(0, 256, (300, 420), dtype=np.uint8)
  for halo in (32, None):
    config = _config(halo, tile=128, batch_size=2)
    whole = predict_lib.probabilities(forward, image, config)
    blocks = inference.probabilities(_assemble(forward, image, config, 96, order=-1))
    np.testing.assert_allclose(blocks, whole, rtol=0, atol=4 * np.finfo(np.float32).eps, err_msg=f"halo {halo}")


def test_the_block_grid_partitions_the_section_into_chunk_multiples():
  blocks = blockwise.block_grid((1000, 700), 256, chunk=128)
  cover = np.zeros((1000, 700), int)
  for b in blocks:
    cover[b.top:b.bottom, b.left:b.right] += 1
    assert b.top % 128 == 0 and b.left % 128 == 0
  assert (cover == 1).all() and len(blocks) == 4 * 3
  with pytest.raises(ValueError, match="multiple of config.predict.volume.chunk"):
    blockwise.block_grid((100, 100), 200, chunk=128)
