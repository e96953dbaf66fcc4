"""Tests of the model registry, parameter counting and input normalization."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from urisc_jax import models


def test_registry_finds_model_modules():
  assert {"unet", "linknet"} <= set(models.available())
  assert type(models.build("linknet")).__name__ == "LinkNet"


def test_unknown_names_list_valid_ones():
  with pytest.raises(ValueError, match="unknown model 'segnet'; valid models: .*linknet.*unet"):
    models.build("segnet")
  with pytest.raises(ValueError, match="no option 'depth'; valid options: .*encoder.*width"):
    models.build("unet", depth=5)
  with pytest.raises(ValueError, match="valid encoders"):
    models.build("unet", encoder="resnet20")


def test_count_params_skips_running_statistics():
  variables = {"params": {"a": np.zeros((3, 4)), "b": {"c": np.zeros(5)}}, "batch_stats": {"m": np.zeros(100)}}
  assert models.count_params(variables) == 17
  assert models.count_params(variables["params"]["b"]) == 5


def test_cem500k_normalization():
  norm = models.input_normalization["cem500k"]
  assert (norm.mean, norm.std) == (0.57287007, 0.12740536)
  x = np.array([0.57287007, 0.57287007 + 0.12740536])
  np.testing.assert_allclose(norm(x), [0.0, 1.0], atol=1e-6)
  assert norm(jnp.asarray(x)).dtype == jnp.float32


def test_random_variables_follow_the_abstract_tree():
  model = models.build("linknet", encoder="resnet18", width=0.125)
  abstract = models.abstract_variables(model, (1, 32, 32, 1))
  variables = models.random_variables(abstract, seed=1)
  assert jax.tree.structure(variables) == jax.tree.structure(abstract)
  assert all(a.shape == b.shape and a.dtype == b.dtype
             for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(abstract)))
  kernel = variables["params"]["encoder"]["layer1"]["block0"]["conv1"]["kernel"]  # [3, 3, 8, 8]
  assert abs(float(np.std(kernel)) - np.sqrt(2 / 72)) < 0.05
  np.testing.assert_array_equal(variables["batch_stats"]["encoder"]["bn1"]["var"], 1.0)


def test_dtype_may_be_given_as_a_string():
  assert models.build("unet", dtype="bfloat16").dtype == jnp.bfloat16


def test_input_multiple_is_what_the_model_checks():
  for name in models.available():
    multiple = models.input_multiple(name)
    model = models.build(name, width=0.125) if name != "casenet" else models.build(name, encoder="resnet18",
                                                                                  width=0.125)
    with pytest.raises(ValueError, match=str(multiple)):
      jax.eval_shape(lambda x: model.init(jax.random.key(0), x), jnp.zeros((1, multiple * 3 + multiple // 2, 64, 1)))
