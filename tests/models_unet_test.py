"""Tests of the U-Net-ResNet: smp parameter counts, forward/train semantics of a tiny model, dtype and size rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from urisc_jax import models


def _counts(model):
  params = models.abstract_variables(model, (1, 64, 64, 1))["params"]
  return models.count_params(params), {k: models.count_params(v) for k, v in params.items()}


def test_resnet50_unet_matches_smp_parameter_counts():
  total, parts = _counts(models.build("unet", encoder="resnet50", in_channels=1, num_classes=1))
  assert total == 32_514_833
  assert parts == {"encoder": 23_501_760, "decoder": 9_012_928, "head": 145}


def test_resnet18_unet_matches_smp_parameter_count():
  assert _counts(models.build("unet", encoder="resnet18"))[0] == 14_321_937


def test_default_is_the_papers_resnet50():
  assert models.build("unet").encoder == "resnet50"


@pytest.fixture(scope="module")
def tiny():
  model = models.build("unet", encoder="resnet18", width=0.125)
  x = jax.random.normal(jax.random.key(1), (2, 64, 64, 1))
  variables = models.init_variables(model, x.shape)
  return model, variables, x, jax.jit(lambda v, x: model.apply(v, x, train=False))


def test_tiny_forward_shapes_and_finite(tiny):
  model, variables, x, predict = tiny
  logits = predict(variables, x)
  assert logits.shape == (2, 64, 64, 1) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()
  assert variables["params"]["encoder"]["conv1"]["kernel"].shape == (7, 7, 1, 8)


def test_eval_is_per_image_and_train_updates_batch_stats(tiny):
  model, variables, x, predict = tiny
  # Eval mode normalizes with running statistics, so each image's logits do not depend on the rest of the batch.
  both = predict(variables, x)
  first = predict(variables, x[:1])
  np.testing.assert_allclose(both[:1], first, rtol=1e-5, atol=1e-5)
  logits, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
  assert logits.shape == (2, 64, 64, 1)
  old = variables["batch_stats"]["encoder"]["bn1"]["mean"]
  new = updates["batch_stats"]["encoder"]["bn1"]["mean"]
  assert not np.allclose(old, new)
  assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(variables["batch_stats"])


def test_bfloat16_compute_keeps_float32_params_and_logits(tiny):
  _, variables, x, predict = tiny
  bf16 = models.build("unet", encoder="resnet18", width=0.125, dtype=jnp.bfloat16)
  shapes = jax.eval_shape(lambda x: bf16.init(jax.random.key(0), x, train=False), x)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(shapes))
  low = jax.jit(lambda v, x: bf16.apply(v, x, train=False))(variables, x)
  high = predict(variables, x)
  assert low.dtype == jnp.float32
  assert np.linalg.norm(low - high) / np.linalg.norm(high) < 0.05


def test_input_size_must_be_divisible_by_32(tiny):
  model, variables, _, _ = tiny
  with pytest.raises(ValueError, match="divisible by 32"):
    jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, jnp.zeros((1, 48, 64, 1)))
  # Non-square sizes that are multiples of 32 work.
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, jnp.zeros((1, 32, 96, 1)))
  assert out.shape == (1, 32, 96, 1)
