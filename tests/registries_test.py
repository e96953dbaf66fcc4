"""Models and losses defined outside the package, registered by decorator, built by name and through the config."""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from urisc_jax import config_checks, losses, models, state


@pytest.fixture(autouse=True)
def own_registries(monkeypatch):
  """Registrations stay inside each test: the other tests enumerate the registries."""
  monkeypatch.setattr(models, "_REGISTERED", dict(models._REGISTERED))  # pylint: disable=protected-access
  monkeypatch.setattr(losses, "LOSSES", dict(losses.LOSSES))


def _register_model():
  @models.register("outside_conv", input_multiple=4)
  class OutsideConv(nn.Module):
    """Two convolutions: [N, H, W, in_channels] -> float32 [N, H, W, num_classes]; takes the tiny config's keys."""
    in_channels: int = 1
    num_classes: int = 1
    encoder: str = "none"
    width: float = 1.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
      x = nn.relu(nn.Conv(max(1, int(8 * self.width)), (3, 3), dtype=self.dtype)(x))
      x = nn.BatchNorm(use_running_average=not train)(x)
      return nn.Conv(self.num_classes, (1, 1), dtype=self.dtype)(x).astype(jnp.float32)

  return OutsideConv


def test_a_registered_model_is_built_by_name_and_through_the_config():
  cls = _register_model()
  assert "outside_conv" in models.available() and models.input_multiple("outside_conv") == 4
  model = models.build("outside_conv", num_classes=2, width=0.5)
  assert isinstance(model, cls) and model.num_classes == 2
  variables = models.init_variables(model, (2, 8, 8, 1))
  assert model.apply(variables, jnp.ones((2, 8, 8, 1)), train=False).shape == (2, 8, 8, 2)
  assert models.count_params(variables) == 9 * 4 + 4 + 2 * 4 + 4 * 2 + 2  # conv, BatchNorm scale and bias, 1x1

  config = tiny.get_config()
  config.model.name = "outside_conv"
  config_checks.validate(config, "predict")  # the model section: name, input multiple, options
  built = state.build_model(config.model)
  assert isinstance(built, cls) and (built.in_channels, built.num_classes) == (1, 1)
  assert built.width == config.model.width


def test_a_model_name_is_taken_once():
  _register_model()
  _register_model()  # the same class again (its module re-run): allowed
  with pytest.raises(ValueError, match="already registered"):
    models.register("outside_conv")(type("Other", (nn.Module,), {}))
  with pytest.raises(ValueError, match="one of urisc_jax's own models"):
    models.register("unet")(type("Unet", (nn.Module,), {}))
  with pytest.raises(ValueError, match="positive integer"):
    models.register("bad", input_multiple=0)


def test_a_registered_loss_is_found_by_the_config_with_its_options():
  @losses.register("weighted_bce")
  def weighted_bce(logits, labels, *, membrane_weight: float = 1.0):
    """[N, H, W, 1] logits and labels -> scalar: BCE with membrane pixels weighted."""
    logits, labels = jnp.asarray(logits, jnp.float32), jnp.asarray(labels, jnp.float32)
    per_pixel = jnp.logaddexp(0.0, logits) - labels * logits
    return jnp.mean(per_pixel * (1.0 + (membrane_weight - 1.0) * labels))

  labels = (np.random.default_rng(0).random((2, 8, 8, 1)) < 0.2).astype(np.float32)
  logits = np.random.default_rng(1).normal(size=(2, 8, 8, 1)).astype(np.float32)
  loss_fn = losses.from_config({"name": "weighted_bce", "membrane_weight": 3.0, "gamma": 2.0})  # gamma: focal's
  np.testing.assert_allclose(float(loss_fn(logits, labels)), float(weighted_bce(logits, labels, membrane_weight=3.0)),
                             rtol=1e-6)
  np.testing.assert_allclose(float(losses.from_config({"name": "weighted_bce"})(logits, labels)),
                             float(losses.binary_cross_entropy(logits, labels)), rtol=1e-6)

  config = tiny.get_config()
  config.loss.name = "weighted_bce"
  assert losses.from_config(config.loss)(logits, labels).shape == ()


def test_a_loss_name_is_taken_once():
  with pytest.raises(ValueError, match="already registered"):
    losses.register("dice")(lambda logits, labels: 0.0)
  assert losses.register("dice")(losses.soft_dice) is losses.soft_dice
