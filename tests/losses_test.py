"""Loss properties: perfect masks cost ~0, focal(gamma=0) is BCE, gradients stay finite on empty crops, hand-computed
class-balanced BCE and soft F1, deep supervision over CASENet's side outputs, and the config."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from urisc_jax import losses
from urisc_jax import state as state_lib


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
  if name == "balanced_bce":
    # HED's weighting: a batch without membrane gives background the membrane fraction, 0, as weight.
    assert float(jnp.abs(grads).sum()) == 0
  else:
    assert float(jnp.abs(grads).sum()) > 0


def test_from_config_rejects_unknown_names():
  with pytest.raises(ValueError, match="config.loss.name.*balanced_bce.*soft_f1"):
    losses.from_config({"name": "nope"})


def _logits(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * 2, jnp.float32)


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_a_perfect_confident_mask_costs_almost_nothing_for_every_loss(name):
  labels = _labels(4)
  logits = jnp.where(labels > 0, 30.0, -30.0)
  assert float(losses.LOSSES[name](logits, labels)) < 1e-6


def test_focal_alpha_weights_membrane_and_background_as_a_hand_computation():
  labels, logits = _labels(5), _logits(6, (2, 16, 16, 1))
  p = 1 / (1 + np.exp(-np.asarray(logits, np.float64)))
  p_t = np.where(labels > 0, p, 1 - p)
  w_t = np.where(labels > 0, 0.7, 0.3)
  reference = np.mean(-w_t * (1 - p_t) ** 2 * np.log(p_t))
  np.testing.assert_allclose(float(losses.sigmoid_focal(logits, labels, gamma=2.0, alpha=0.7)), reference, rtol=1e-5)


def test_class_balanced_bce_weights_each_class_by_the_other_class_fraction():
  # 2 of 8 pixels are membrane: membrane pixels weigh 6/8, background pixels 2/8.
  labels = np.array([1, 0, 0, 1, 0, 0, 0, 0], np.float32).reshape(2, 2, 2, 1)
  logits = np.array([2.0, -1.0, 0.5, -0.3, 0.0, 3.0, -2.0, 1.0], np.float32).reshape(2, 2, 2, 1)
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  per_pixel = np.where(labels > 0, -(6 / 8) * np.log(p), -(2 / 8) * np.log(1 - p))
  np.testing.assert_allclose(float(losses.class_balanced_bce(logits, labels)), per_pixel.mean(), rtol=1e-6)


def test_class_balanced_bce_gives_both_classes_equal_total_weight():
  # At p = 0.5 every pixel costs log 2; the weighted totals of the two classes are then equal.
  labels = _labels(7)
  membrane = labels.mean()
  loss = float(losses.class_balanced_bce(np.zeros_like(labels), labels))
  np.testing.assert_allclose(loss, 2 * membrane * (1 - membrane) * np.log(2), rtol=1e-5)


def test_soft_f1_matches_a_numpy_reference_pooled_over_the_batch():
  labels, logits = _labels(8), _logits(9, (2, 16, 16, 1))
  p = 1 / (1 + np.exp(-np.asarray(logits, np.float64)))
  tp, fp, fn = np.sum(p * labels), np.sum(p * (1 - labels)), np.sum((1 - p) * labels)
  reference = 1 - 2 * tp / (2 * tp + fp + fn)
  np.testing.assert_allclose(float(losses.soft_f1(logits, labels, smooth=0.0)), reference, rtol=1e-5)
  smoothed = 1 - (2 * tp + 1) / (2 * tp + fp + fn + 1)
  np.testing.assert_allclose(float(losses.soft_f1(logits, labels)), smoothed, rtol=1e-5)


def test_bfloat16_logits_give_the_float32_loss():
  labels, logits = _labels(10), _logits(11, (2, 16, 16, 1))
  rounded = logits.astype(jnp.bfloat16)
  for name, loss_fn in losses.LOSSES.items():
    value = loss_fn(rounded, labels)
    assert value.dtype == jnp.float32, name
    np.testing.assert_allclose(float(value), float(loss_fn(rounded.astype(jnp.float32), labels)), rtol=1e-6)


def test_deep_supervision_sums_the_fused_and_side_losses():
  labels = _labels(12)
  fused, side_a, side_b = (_logits(s, labels.shape) for s in (13, 14, 15))
  state = {"batch_stats": {}, "intermediates": {"side_logits": (side_a, side_b)}}
  total = losses.deeply_supervised(losses.class_balanced_bce, fused, labels, losses.side_logits(state),
                                   side_weight=0.5)
  expected = sum(w * float(losses.class_balanced_bce(x, labels)) for w, x in ((1, fused), (0.5, side_a), (0.5, side_b)))
  np.testing.assert_allclose(float(total), expected, rtol=1e-6)


def test_deep_supervision_without_side_logits_names_the_config_key():
  with pytest.raises(ValueError, match="config.loss.deep_supervision"):
    losses.side_logits({"batch_stats": {}})


class _LinearWithSide(nn.Module):
  """A per-pixel linear model that sows one side output the way CASENet does."""
  sow_sides: bool = True

  @nn.compact
  def __call__(self, x, train=False):
    del train
    if self.sow_sides:
      self.sow("intermediates", "side_logits", nn.Dense(1, name="side")(x))
    return nn.Dense(1, name="head")(x)


def _uint8_batch(seed=22, n=2, size=8):
  image = np.random.default_rng(seed).integers(0, 256, (n, size, size, 1), dtype=np.uint8)
  return {"image": image, "label": (image < 60).astype(np.uint8)}


def test_the_train_step_supervises_the_sown_side_logits():
  from urisc_jax import train
  model, batch = _LinearWithSide(), _uint8_batch()
  params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
  tx = optax.sgd(0.1)
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats={},
                               opt_state=tx.init(params))
  step = jax.jit(train.make_train_step(model, tx, losses.class_balanced_bce, mean=0.5, std=0.25,
                                       deep_supervision=True))
  _, metrics = step(state, batch, jax.random.key(1))
  x = (batch["image"].astype(np.float32) / 255 - 0.5) / 0.25
  fused, sown = model.apply({"params": params}, x, mutable=["intermediates"])
  (side,) = sown["intermediates"]["side_logits"]
  expected = losses.class_balanced_bce(fused, batch["label"]) + losses.class_balanced_bce(side, batch["label"])
  np.testing.assert_allclose(float(metrics["loss"]), float(expected), rtol=1e-5)


def test_deep_supervision_of_a_model_without_sides_names_the_config_key():
  from urisc_jax import train
  model = _LinearWithSide(sow_sides=False)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
  tx = optax.sgd(0.1)
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats={},
                               opt_state=tx.init(params))
  step = train.make_train_step(model, tx, losses.binary_cross_entropy, mean=0.5, std=0.25, deep_supervision=True)
  with pytest.raises(ValueError, match="config.loss.deep_supervision"):
    step(state, _uint8_batch(), jax.random.key(1))


_OPTIONS = {"gamma": 0.5, "alpha": 0.6, "dice_weight": 0.3, "deep_supervision": False}
_EXPECTED = {  # what each name must compute with _OPTIONS: its own options applied, the others' ignored
    "focal_dice": lambda x, y: losses.focal_dice(x, y, gamma=0.5, alpha=0.6, dice_weight=0.3),
    "focal": lambda x, y: losses.sigmoid_focal(x, y, gamma=0.5, alpha=0.6),
    "dice": losses.soft_dice,
    "bce": losses.binary_cross_entropy,
    "balanced_bce": losses.class_balanced_bce,
    "soft_f1": losses.soft_f1,
}


@pytest.mark.parametrize("name", sorted(_EXPECTED))
def test_from_config_applies_the_losss_options_and_ignores_the_others(name):
  labels, logits = _labels(18), _logits(19, (2, 16, 16, 1))
  loss_fn = losses.from_config({"name": name, **_OPTIONS})
  np.testing.assert_allclose(float(loss_fn(logits, labels)), float(_EXPECTED[name](logits, labels)), rtol=1e-6)


def test_every_registered_loss_is_covered_by_the_config_test():
  assert set(_EXPECTED) == set(losses.LOSSES)


def test_from_config_reads_the_default_config():
  from configs import default
  config = default.get_config()
  labels, logits = _labels(20), _logits(21, (2, 16, 16, 1))
  np.testing.assert_allclose(float(losses.from_config(config.loss)(logits, labels)),
                             float(losses.focal_dice(logits, labels, gamma=2.0, dice_weight=1.0)), rtol=1e-6)


def test_from_config_rejects_options_no_loss_takes():
  with pytest.raises(ValueError, match="config.loss option.*'gama'"):
    losses.from_config({"name": "focal", "gama": 2.0})
