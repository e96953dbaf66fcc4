"""Mask clean-up against scikit-image's independent implementations and a hand-built example."""

import numpy as np
import pytest
from skimage import morphology

from configs import default
from urisc_jax import postprocess


def _random_mask(shape, density, seed):
  return np.random.default_rng(seed).random(shape) < density


@pytest.mark.parametrize("density,seed", [(0.1, 0), (0.3, 1), (0.5, 2)])
@pytest.mark.parametrize("min_size", [2, 3, 7])
def test_small_membrane_removal_matches_skimage_with_8_connectivity(density, seed, min_size):
  mask = _random_mask((97, 130), density, seed)
  expected = morphology.remove_small_objects(mask, max_size=min_size - 1, connectivity=2)
  result = postprocess.remove_small_membrane(mask, min_size)
  np.testing.assert_array_equal(result, expected)
  assert result.sum() < mask.sum()  # the comparison is not vacuous


@pytest.mark.parametrize("density,seed", [(0.5, 3), (0.7, 4), (0.85, 5)])
@pytest.mark.parametrize("below", [2, 4, 10])
def test_small_hole_filling_matches_skimage_with_4_connectivity(density, seed, below):
  mask = _random_mask((88, 101), density, seed)
  expected = morphology.remove_small_holes(mask, max_size=below - 1, connectivity=1)
  result = postprocess.fill_small_holes(mask, below)
  np.testing.assert_array_equal(result, expected)
  assert result.sum() > mask.sum()


@pytest.mark.parametrize("radius", [1, 2, 3])
@pytest.mark.parametrize("density,seed", [(0.05, 6), (0.2, 7)])
def test_closing_matches_skimage_and_only_adds_membrane(radius, density, seed):
  mask = _random_mask((75, 90), density, seed)
  np.testing.assert_array_equal(postprocess.disk(radius), morphology.disk(radius).astype(bool))
  expected = morphology.closing(mask, footprint=morphology.disk(radius), mode="ignore")
  result = postprocess.close_membrane(mask, radius)
  np.testing.assert_array_equal(result, expected)
  assert (result >= mask).all() and result.sum() > mask.sum()


def test_hand_built_membranes():
  mask = np.zeros((12, 14), bool)
  mask[:, 6:9] = True  # a vertical membrane, 3 px thick, splitting the image into two cells ...
  mask[5, 6:9] = False  # ... with a one-pixel gap
  mask[1, 1] = mask[2, 2] = True  # a diagonal speck: one 8-connected component of 2 px
  mask[9, 12] = True  # a single pixel

  closed = postprocess.close_membrane(mask, 1)  # the disk of radius 1 is the 3 x 3 cross
  assert closed[5, 7] and (closed ^ mask).sum() == 1  # the gap's middle closes, nothing else changes

  cleaned = postprocess.remove_small_membrane(mask, 3)
  assert not cleaned[1, 1] and not cleaned[2, 2] and not cleaned[9, 12]
  np.testing.assert_array_equal(cleaned[:, 6:9], mask[:, 6:9])  # both halves of the line have >= 3 px
  kept_speck = postprocess.remove_small_membrane(mask, 2)
  assert kept_speck[1, 1] and kept_speck[2, 2] and not kept_speck[9, 12]  # diagonal neighbours are connected

  ring = np.zeros((9, 9), bool)
  ring[1:8, 1:8] = True
  ring[3:6, 3:6] = False  # a 3 x 3 hole inside a thick membrane
  np.testing.assert_array_equal(postprocess.fill_small_holes(ring, 10)[3:6, 3:6], True)
  np.testing.assert_array_equal(postprocess.fill_small_holes(ring, 9), ring)  # 9 px is not fewer than 9

  diagonal = np.eye(6, dtype=bool)  # a one-pixel diagonal line cuts background into two 4-connected cells of 15 px
  np.testing.assert_array_equal(postprocess.fill_small_holes(diagonal, 15), diagonal)
  assert postprocess.fill_small_holes(diagonal, 16).all()


def test_postprocess_applies_closing_before_counting_sizes():
  dashed = np.zeros((5, 41), bool)
  dashed[1:4, np.arange(41) % 3 != 2] = True  # dashes of 3 x 2 px, 1 px apart: specks alone, a membrane together
  assert not postprocess.remove_small_membrane(dashed, 10).any()
  result = postprocess.postprocess(dashed, {"closing_radius": 1, "min_membrane_size": 10})
  np.testing.assert_array_equal(result[2], True)  # closing bridged the gaps, so the joined membrane was kept
  np.testing.assert_array_equal(result, postprocess.close_membrane(dashed, 1))


def test_the_default_config_is_off_and_leaves_masks_untouched():
  options = default.get_config().predict.postprocess
  assert not postprocess.is_enabled(options)
  mask = _random_mask((30, 40), 0.3, 8)
  kept = mask.copy()
  result = postprocess.postprocess(mask, options)
  np.testing.assert_array_equal(result, mask)
  assert result is not mask
  assert postprocess.postprocess(mask, None) is not mask
  postprocess.postprocess(mask, {"closing_radius": 2, "min_membrane_size": 4, "fill_holes_below": 4})
  np.testing.assert_array_equal(mask, kept)  # inputs are never modified


def test_rejects_bad_masks_and_options():
  mask = np.zeros((4, 4), bool)
  with pytest.raises(ValueError, match="boolean membrane mask"):
    postprocess.postprocess(mask.astype(np.float32), None)
  with pytest.raises(ValueError, match="boolean membrane mask"):
    postprocess.remove_small_membrane(np.zeros((2, 4, 4), bool), 3)
  with pytest.raises(ValueError, match="unknown option"):
    postprocess.postprocess(mask, {"closing": 1})
  with pytest.raises(ValueError, match="min_membrane_size"):
    postprocess.postprocess(mask, {"min_membrane_size": -1})
  with pytest.raises(ValueError, match="closing_radius"):
    postprocess.close_membrane(mask, 1.5)
  with pytest.raises(ValueError, match="fill_holes_below"):
    postprocess.fill_small_holes(mask, None)


def test_the_threshold_is_chosen_for_the_post_processed_mask():
  """choose_threshold scores each candidate's post-processed mask: the official scorer on those masks agrees."""
  import types  # pylint: disable=g-import-not-at-top
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from urisc_jax import inference, predict  # pylint: disable=g-import-not-at-top
  from urisc_jax.evaluation import threshold as thresholds  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(11)
  truth = np.zeros((96, 128), bool)
  truth[20:23], truth[:, 60:63], truth[70:72] = True, True, True
  gray = rng.integers(150, 256, truth.shape)
  gray[truth] = rng.integers(0, 110, truth.sum())
  specks = (rng.random(truth.shape) < 0.02) & ~truth  # dark one-pixel noise that a threshold alone keeps
  gray[specks] = rng.integers(0, 90, specks.sum())
  image = gray.astype(np.uint8)
  gt = np.where(truth, 0, 255).astype(np.uint8)
  validation = types.SimpleNamespace(name="val", image=lambda: image, official_label=lambda: gt)

  def darkness_forward(tiles):  # a pointwise "network": darker = more membrane
    return (128.0 - np.asarray(tiles[..., 0], np.float32)) / 16.0

  config = tiny.get_config()
  config.predict.postprocess.min_membrane_size = 4
  chosen = predict.choose_threshold(darkness_forward, [validation], config)

  probability = predict.probabilities(darkness_forward, image, config.predict)
  reference = [predict.score_submission(
      inference.submission(postprocess.postprocess(probability >= t, config.predict.postprocess)), gt,
      gt_mode="official")["f1"] for t in predict.THRESHOLD_CANDIDATES]
  assert chosen["threshold"] == predict.THRESHOLD_CANDIDATES[int(np.argmax(reference))]
  assert chosen["val_f1"] == pytest.approx(max(reference), abs=1e-12)
  assert chosen["postprocess"] == {"min_membrane_size": 4, "fill_holes_below": 0, "closing_radius": 0}
  # The post-processing matters here: removing the specks beats every threshold of the raw map.
  raw = thresholds.f1_per_candidate(probability, gt, predict.THRESHOLD_CANDIDATES)
  assert max(reference) > raw.max() + 0.02
