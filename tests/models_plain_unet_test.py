"""Tests of the plain (Ronneberger 2015) U-Net."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from urisc_jax import models


def test_paper_configuration_has_23_convs_and_31m_parameters():
  # The 2015 U-Net (no BN) for one input channel and two classes has 31,030,658 parameters.
  model = models.build("plain_unet", batch_norm=False, num_classes=2)
  params = models.abstract_variables(model, (1, 64, 64, 1))["params"]
  assert models.count_params(params) == 31_030_658
  kernels = [path for path, _ in jax.tree_util.tree_flatten_with_path(params)[0] if path[-1].key == "kernel"]
  assert len(kernels) == 23
  assert params["encoder"]["block4"]["conv2"]["kernel"].shape == (3, 3, 1024, 1024)
  assert params["decoder"]["block0"]["up"]["kernel"].shape == (2, 2, 1024, 512)


def test_batch_norm_version_replaces_conv_biases_by_bn():
  params = models.abstract_variables(models.build("plain_unet"), (1, 64, 64, 1))["params"]
  # 18 3x3 convs lose their bias and gain a BN scale and bias: + sum of their output channels.
  convs3x3 = 2 * (64 + 128 + 256 + 512 + 1024) + 2 * (512 + 256 + 128 + 64)
  assert models.count_params(params) == 31_030_658 - 65 + convs3x3  # -65: the 1-class head has 65 fewer


def test_tiny_forward_keeps_size():
  model = models.build("plain_unet", width=0.125)
  x = jax.random.normal(jax.random.key(0), (1, 48, 80, 1))
  variables = models.random_variables(models.abstract_variables(model, x.shape))
  logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  assert logits.shape == (1, 48, 80, 1) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()
  with pytest.raises(ValueError, match="divisible by 16"):
    models.abstract_variables(model, (1, 40, 80, 1))
