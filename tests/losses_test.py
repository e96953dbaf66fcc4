"""Loss properties: perfect masks cost ~0, focal(gamma=0) is BCE, gradients stay finite on empty crops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from urisc_jax import losses


def _labels(seed=0, shape=(2, 16, 16, 1)):
  return (np.random.default_rng(seed).random(shape) < 0.1).astype(np.float32)


def test_perfect_confident_prediction_costs_almost_nothing():
  labels = _labels()
  logits = jnp.where(labels > 0, 30.0, -30.0)
  assert float(losses.focal_dice(logits, labels)) < 1e-6


def test_all_background_crop_predicted_background_costs_almost_nothing():
  labels = np.zeros((2, 16, 16, 1), np.float32)
  assert float(losses.focal_dice(jnp.full(labels.shape, -30.0), labels)) < 1e-6


def test_focal_with_gamma_zero_is_binary_cross_entropy():
  labels = _labels(1)
  logits = jnp.asarray(np.random.default_rng(2).normal(size=labels.shape) * 3, jnp.float32)
  # An independent BCE: -y log p - (1 - y) log(1 - p) with p = sigmoid(logits), in float64.
  p = 1 / (1 + np.exp(-np.asarray(logits, np.float64)))
  reference = np.mean(-labels * np.log(p) - (1 - labels) * np.log(1 - p))
  np.testing.assert_allclose(float(losses.sigmoid_focal(logits, labels, gamma=0.0)), reference, rtol=1e-5)
  np.testing.assert_allclose(float(losses.binary_cross_entropy(logits, labels)), reference, rtol=1e-5)


def test_focal_down_weights_easy_pixels():
  labels = np.ones((1, 4, 4, 1), np.float32)
  easy = jnp.full(labels.shape, 4.0)
  ratio = float(losses.sigmoid_focal(easy, labels, gamma=2.0)) / float(losses.sigmoid_focal(easy, labels, gamma=0.0))
  p = 1 / (1 + np.exp(-4.0))
  np.testing.assert_allclose(ratio, (1 - p) ** 2, rtol=1e-5)


def test_soft_dice_matches_hand_computation():
  labels = np.array([[1.0, 0.0], [1.0, 0.0]], np.float32).reshape(1, 2, 2, 1)
  logits = np.zeros_like(labels)  # p = 0.5 everywhere
  expected = 1 - (2 * 1.0 + 1) / (2.0 + 2.0 + 1)
  np.testing.assert_allclose(float(losses.soft_dice(logits, labels)), expected, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_gradients_are_finite_on_all_background_crops(name):
  labels = np.zeros((2, 8, 8, 1), np.float32)
  logits = jnp.asarray(np.random.default_rng(3).normal(size=labels.shape), jnp.float32)
  grads = jax.grad(lambda x: losses.LOSSES[name](x, labels))(logits)
  assert np.all(np.isfinite(np.asarray(grads)))
  assert float(jnp.abs(grads).sum()) > 0


def test_from_config_rejects_unknown_names():
  with pytest.raises(ValueError, match="config.loss.name"):
    losses.from_config({"name": "nope"})
