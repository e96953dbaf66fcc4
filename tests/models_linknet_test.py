"""Tests of the LinkNet-ResNet: smp parameter counts and a tiny model's forward pass."""

import jax
import jax.numpy as jnp
import numpy as np

from urisc_jax import models


def _parts(model):
  params = models.abstract_variables(model, (1, 64, 64, 1))["params"]
  return {k: models.count_params(v) for k, v in params.items()}


def test_resnet18_linknet_matches_smp_parameter_counts():
  parts = _parts(models.build("linknet", encoder="resnet18", in_channels=1, num_classes=1))
  assert parts == {"encoder": 11_170_240, "decoder": 487_232, "head": 33}
  assert sum(parts.values()) == 11_657_505


def test_resnet50_linknet_matches_smp_parameter_count():
  assert sum(_parts(models.build("linknet", encoder="resnet50")).values()) == 31_171_505


def test_default_is_the_papers_resnet18():
  assert models.build("linknet").encoder == "resnet18"


def test_tiny_forward_and_classes():
  model = models.build("linknet", encoder="resnet18", width=0.25, num_classes=2)
  x = jax.random.normal(jax.random.key(1), (2, 64, 96, 1))
  variables = models.random_variables(models.abstract_variables(model, x.shape))
  logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  assert logits.shape == (2, 64, 96, 2) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()
  # The transposed convs of the decoder are the torch k4 s2 p1 ones: kernel [4, 4, in/4, in/4].
  assert variables["params"]["decoder"]["block0"]["deconv"]["kernel"].shape == (4, 4, 32, 32)
