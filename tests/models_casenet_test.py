"""Tests of CASENet (original and U-RISC variants): side structure, sliced-concatenation fusion, bilinear deconvs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from urisc_jax import models
from urisc_jax.models import casenet
from urisc_jax.models import layers


def test_original_side_and_fuse_parameter_counts():
  params = models.abstract_variables(models.build("casenet", variant="original", num_classes=3), (1, 32, 32, 1))
  params = params["params"]
  assert models.count_params(params["encoder"]) == 58_137_536  # ResNet-152 without fc, one input channel
  # side1: 64 + 1; side2: 256 + 1 + 4*4 deconv; side3: 512 + 1 + 8*8; side5: 2048*3 + 3 + 16*16*3 (per class).
  assert models.count_params(params["sides"]) == 65 + 273 + 577 + (6144 + 3 + 768)
  assert params["fuse"]["kernel"].shape == (1, 1, 4, 3)  # grouped: 4 inputs per class


def test_urisc_variant_uses_deep_stem_and_five_sides():
  params = models.abstract_variables(models.build("casenet"), (1, 32, 32, 1))["params"]
  assert {"stem_conv1", "stem_conv2", "stem_conv3"} <= set(params["encoder"])
  assert params["encoder"]["stem_conv3"]["kernel"].shape == (3, 3, 64, 128)
  assert params["sides"]["side1_conv"]["kernel"].shape == (1, 1, 128, 1)
  assert params["fuse"]["kernel"].shape == (1, 1, 5, 1)


def test_bilinear_deconv_init_is_bilinear_upsampling_inside():
  x = jax.random.normal(jax.random.key(0), (1, 6, 6, 1))
  for factor in (2, 4, 8):
    deconv = layers.ConvTranspose2d(1, 2 * factor, factor, factor // 2, use_bias=False,
                                    kernel_init=casenet.bilinear_kernel_init)
    y = deconv.apply(deconv.init(jax.random.key(0), x), x)
    want = layers.resize_bilinear(x, 6 * factor, 6 * factor)
    inner = slice(factor, 5 * factor)  # the borders differ: the deconv sees zeros beyond the edge
    np.testing.assert_allclose(y[:, inner, inner], want[:, inner, inner], atol=1e-5)


@pytest.fixture(scope="module")
def original():
  model = models.build("casenet", variant="original", encoder="resnet18", width=0.125, num_classes=2)
  x = jax.random.normal(jax.random.key(1), (1, 32, 32, 1))
  return model, models.random_variables(models.abstract_variables(model, x.shape)), x


def test_sliced_concatenation_orders_channels_by_class(original):
  model, variables, x = original
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(1, 1, 4, 2)).astype(np.float32)
  bias = np.asarray([0.5, -1.0], np.float32)
  params = dict(variables["params"], fuse={"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)})
  fused, state = jax.jit(lambda v, x: model.apply(v, x, train=False, capture_intermediates=True,
                                                  mutable=["intermediates"]))(dict(variables, params=params), x)
  side1, side2, side3, side5 = state["intermediates"]["sides"]["__call__"][0]
  assert fused.shape == (1, 32, 32, 2) and side1.shape == (1, 32, 32, 1) and side5.shape == (1, 32, 32, 2)
  np.testing.assert_array_equal(state["intermediates"]["side_logits"][0], side5)
  for k in range(2):
    w = kernel[0, 0, :, k]
    want = w[0] * side5[..., k] + w[1] * side1[..., 0] + w[2] * side2[..., 0] + w[3] * side3[..., 0] + bias[k]
    np.testing.assert_allclose(fused[..., k], want, rtol=1e-4, atol=1e-5)


def test_urisc_variant_sows_five_sides_and_trains():
  model = models.build("casenet", encoder="resnet18", width=0.125)
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 1))
  variables = models.random_variables(models.abstract_variables(model, x.shape))
  fused, state = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats", "intermediates"]))(
      variables, x)
  sides = state["intermediates"]["side_logits"]
  assert fused.shape == (2, 32, 32, 1) and fused.dtype == jnp.float32
  assert len(sides) == 5 and all(s.shape == (2, 32, 32, 1) for s in sides)
  # In train mode each side's BN standardizes its logits over the batch.
  np.testing.assert_allclose([float(jnp.mean(s)) for s in sides], 0.0, atol=1e-4)
  assert set(state["batch_stats"]) == {"encoder", "sides", "fuse_bn"}


def test_errors():
  with pytest.raises(ValueError, match="valid variants: original, urisc"):
    jax.eval_shape(lambda x: models.build("casenet", variant="hed").init(jax.random.key(0), x),
                   jnp.zeros((1, 32, 32, 1)))
  with pytest.raises(ValueError, match="divisible by 8"):
    models.abstract_variables(models.build("casenet"), (1, 36, 32, 1))
