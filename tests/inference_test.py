"""Sliding-window prediction: exact on pointwise models, TTA views invert, outputs in the competition format."""

import jax.numpy as jnp
import numpy as np
import pytest

from urisc_jax import inference


def _pointwise_forward(tiles):
  """A 'network' whose logit depends on the pixel alone: tiling must reproduce it exactly."""
  return np.asarray(tiles[..., 0], np.float32) / 16.0 - 8.0


@pytest.mark.parametrize("shape", [(200, 300), (64, 64), (50, 70), (129, 65)])
@pytest.mark.parametrize("blend,step", [("gaussian", 0.5), ("constant", 0.5), ("gaussian", 0.25), ("constant", 1.0)])
def test_tiling_reproduces_a_pointwise_model_exactly(shape, blend, step):
  image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
  logits = inference.predict_logits(_pointwise_forward, image, tile=64, step=step, blend=blend, batch_size=3)
  np.testing.assert_allclose(logits, image.astype(np.float32) / 16.0 - 8.0, rtol=1e-6, atol=1e-5)


def test_logits_go_into_a_given_buffer(tmp_path):
  image = np.random.default_rng(1).integers(0, 256, (100, 90), dtype=np.uint8)
  out = np.lib.format.open_memmap(tmp_path / "logits.npy", mode="w+", dtype=np.float32, shape=image.shape)
  result = inference.predict_logits(_pointwise_forward, image, tile=64, out=out)
  assert result is out
  np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), image / 16.0 - 8.0, rtol=1e-6, atol=1e-5)


def test_the_eight_views_are_distinct_and_invert_exactly():
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 8, 8, 1)), jnp.float32)
  seen = []
  for v in inference._VIEWS:
    viewed = inference.view(x, *v)
    np.testing.assert_array_equal(np.asarray(inference.unview(viewed, *v)), np.asarray(x))
    assert not any(np.array_equal(np.asarray(viewed), s) for s in seen)
    seen.append(np.asarray(viewed))


def test_gaussian_weights_peak_in_the_centre_and_stay_positive():
  w = inference.blend_weights(64, "gaussian")
  assert w.shape == (64, 64) and w.min() > 0
  assert w[31, 31] == pytest.approx(w.max()) and w[0, 0] < 0.01
  np.testing.assert_array_equal(w, w.T)


def test_submission_format_and_overlay_colours():
  membrane = np.array([[True, False], [False, True]])
  np.testing.assert_array_equal(inference.submission(membrane), [[0, 255], [255, 0]])
  image = np.full((2, 2), 100, np.uint8)
  truth = np.array([[True, True], [False, False]])
  rgb = inference.overlay(image, membrane, truth)
  assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
  assert tuple(rgb[0, 0]) == (0, 220, 0)  # true positive
  assert tuple(rgb[1, 1]) == (255, 40, 40)  # false positive
  assert tuple(rgb[0, 1]) == (40, 120, 255)  # false negative
  assert tuple(rgb[1, 0]) == (60, 60, 60)  # true negative: dimmed gray


def test_rejects_bad_options():
  image = np.zeros((64, 64), np.uint8)
  with pytest.raises(ValueError, match="blend"):
    inference.predict_logits(_pointwise_forward, image, tile=64, blend="median")
  with pytest.raises(ValueError, match="gray image"):
    inference.predict_logits(_pointwise_forward, np.zeros((64, 64, 3), np.uint8), tile=64)
