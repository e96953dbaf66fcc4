"""Tests of the torch-convention layers against direct numpy definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from urisc_jax.models import layers

# Floating-point comparisons (each layer's forms against torch definitions and each other):
# .ci/run runs them again under XLA's AVX2 cap.
pytestmark = pytest.mark.numerics


def _numpy_conv_transpose(x, weight, bias, stride, padding):
  """torch's ConvTranspose2d by its definition: every input pixel scatters weight[i, o] onto the output.

  x [H, W, Cin], weight [Cin, Cout, k, k] (torch layout), bias [Cout] -> [(H-1)*s - 2p + k, ..., Cout].
  """
  h, w, _ = x.shape
  k = weight.shape[-1]
  full = np.zeros(((h - 1) * stride + k, (w - 1) * stride + k, weight.shape[1]))
  for qy in range(h):
    for qx in range(w):
      full[qy * stride:qy * stride + k, qx * stride:qx * stride + k] += np.einsum("i,iokl->klo", x[qy, qx], weight)
  out_h, out_w = (h - 1) * stride - 2 * padding + k, (w - 1) * stride - 2 * padding + k
  return full[padding:padding + out_h, padding:padding + out_w] + bias


# (4, 2, 1), (2, 2, 0), (8, 4, 2), (16, 8, 4) run as output phases (k - 2p = stride); (3, 1, 1), (3, 2, 1), (6, 3, 0)
# as a dilated convolution.
@pytest.mark.parametrize("kernel_size,stride,padding",
                         [(4, 2, 1), (2, 2, 0), (8, 4, 2), (16, 8, 4), (3, 1, 1), (3, 2, 1), (6, 3, 0)])
def test_conv_transpose_matches_torch_definition(kernel_size, stride, padding):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(5, 6, 3)).astype(np.float32)
  weight = rng.normal(size=(3, 2, kernel_size, kernel_size)).astype(np.float32)
  bias = rng.normal(size=(2,)).astype(np.float32)
  module = layers.ConvTranspose2d(2, kernel_size=kernel_size, stride=stride, padding=padding)
  params = {"kernel": jnp.asarray(weight.transpose(2, 3, 0, 1)), "bias": jnp.asarray(bias)}
  got = module.apply({"params": params}, x[None])[0]
  want = _numpy_conv_transpose(x, weight, bias, stride, padding)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_grouped_conv_transpose_is_per_channel():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(4, 4, 3)).astype(np.float32)
  weight = rng.normal(size=(3, 1, 4, 4)).astype(np.float32)  # torch [Cin, Cout / groups, k, k], groups = 3
  module = layers.ConvTranspose2d(3, kernel_size=4, stride=2, padding=1, groups=3, use_bias=False)
  got = module.apply({"params": {"kernel": jnp.asarray(weight.transpose(2, 3, 1, 0))}}, x[None])[0]
  for c in range(3):
    want = _numpy_conv_transpose(x[..., c:c + 1], weight[c:c + 1], np.zeros(1), 2, 1)
    np.testing.assert_allclose(got[..., c:c + 1], want, rtol=1e-5, atol=1e-5)


def test_grouped_conv_transpose_with_several_outputs_per_group():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(3, 5, 4)).astype(np.float32)
  weight = rng.normal(size=(4, 3, 4, 4)).astype(np.float32)  # groups = 2: inputs 0-1 -> outputs 0-2, 2-3 -> 3-5
  module = layers.ConvTranspose2d(6, kernel_size=4, stride=2, padding=1, groups=2, use_bias=False)
  # torch [Cin, Cout / groups, k, k] -> [k, k, Cin / groups, Cout], the groups' outputs side by side.
  kernel = weight.reshape(2, 2, 3, 4, 4).transpose(3, 4, 1, 0, 2).reshape(4, 4, 2, 6)
  got = module.apply({"params": {"kernel": jnp.asarray(kernel)}}, x[None])[0]
  for group in range(2):
    ins, outs = slice(2 * group, 2 * group + 2), slice(3 * group, 3 * group + 3)
    want = _numpy_conv_transpose(x[..., ins], weight[ins], np.zeros(3), 2, 1)
    np.testing.assert_allclose(got[..., outs], want, rtol=1e-5, atol=1e-5)


def _dilated_conv_transpose(x, kernel, stride, padding, groups):
  """The textbook form: a correlation of the stride-dilated input with the flipped kernel."""
  edge = kernel.shape[0] - 1 - padding
  return jax.lax.conv_general_dilated(x, kernel[::-1, ::-1], (1, 1), ((edge, edge), (edge, edge)),
                                      lhs_dilation=(stride, stride), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      feature_group_count=groups)


@pytest.mark.parametrize("kernel_size,stride,padding,groups", [(4, 2, 1, 1), (2, 2, 0, 1), (8, 4, 2, 2)])
def test_phase_conv_transpose_gradients_equal_the_dilated_forms(kernel_size, stride, padding, groups):
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 4, 5, 4)))
  kernel = jnp.asarray(rng.normal(size=(kernel_size, kernel_size, 4 // groups, 6)))
  cotangent = jnp.asarray(rng.normal(size=(2, 4 * stride, 5 * stride, 6)))

  def grads(fn):
    return jax.grad(lambda x, k: jnp.vdot(fn(x, k, stride, padding, groups), cotangent), argnums=(0, 1))(x, kernel)

  for got, want in zip(grads(layers.conv_transpose2d), grads(_dilated_conv_transpose)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stride,groups", [(1, 1), (2, 1), (1, 4), (2, 2)])
def test_1x1_conv_is_the_per_pixel_matrix_product(stride, groups):
  rng = np.random.default_rng(4)
  x = rng.normal(size=(2, 5, 7, 8)).astype(np.float32)
  kernel = rng.normal(size=(1, 1, 8 // groups, 12)).astype(np.float32)
  got = layers.conv2d(jnp.asarray(x), jnp.asarray(kernel), stride, groups=groups)
  # torch's definition: output (y, x) reads input (stride * y, stride * x); group g maps its inputs to its outputs.
  picked = x[:, ::stride, ::stride].reshape(x.shape[0], -(-5 // stride), -(-7 // stride), groups, 8 // groups)
  weight = kernel[0, 0].reshape(8 // groups, groups, 12 // groups)
  want = np.einsum("nhwgc,cgo->nhwgo", picked, weight).reshape(got.shape)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  lax_conv = jax.lax.conv_general_dilated(jnp.asarray(x), jnp.asarray(kernel), (stride, stride), "VALID",
                                          dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)
  np.testing.assert_allclose(got, lax_conv, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stride", [1, 2])
def test_1x1_conv_gradients_equal_the_convolutions(stride):
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(2, 6, 5, 8)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(1, 1, 8, 3)), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=(2, -(-6 // stride), -(-5 // stride), 3)), jnp.float32)

  def lax_conv(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def grads(fn):
    return jax.grad(lambda x, k: jnp.vdot(fn(x, k), cotangent), argnums=(0, 1))(x, kernel)

  for got, want in zip(grads(lambda x, k: layers.conv2d(x, k, stride)), grads(lax_conv)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("height,width", [(1, 1), (3, 5), (4, 4)])
def test_upsample2_conv3x3_equals_the_conv_of_the_upsampled_image(height, width):
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.normal(size=(2, height, width, 3)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=(2, 2 * height, 2 * width, 4)), jnp.float32)

  def direct(x, kernel):
    return layers.conv2d(layers.upsample_nearest(x, 2), kernel, padding=1)

  np.testing.assert_allclose(layers.upsample2_conv3x3(x, kernel), direct(x, kernel), rtol=1e-5, atol=1e-5)

  def grads(fn):
    return jax.grad(lambda x, k: jnp.vdot(fn(x, k), cotangent), argnums=(0, 1))(x, kernel)

  for got, want in zip(grads(layers.upsample2_conv3x3), grads(direct)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("skip_channels", [0, 2])
def test_upsample_concat_conv_is_the_conv_of_the_concatenation(skip_channels):
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=(1, 3, 4, 3)), jnp.float32)
  skip = jnp.asarray(rng.normal(size=(1, 6, 8, skip_channels)), jnp.float32) if skip_channels else None
  module = layers.UpsampleConcatConv(5)
  variables = module.init(jax.random.key(0), x, skip)
  kernel = variables["params"]["kernel"]
  assert kernel.shape == (3, 3, 3 + skip_channels, 5)
  concatenated = layers.upsample_nearest(x, 2)
  if skip is not None:
    concatenated = jnp.concatenate([concatenated, skip], axis=-1)
  want = jax.lax.conv_general_dilated(concatenated, kernel, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(module.apply(variables, x, skip), want, rtol=1e-5, atol=1e-5)


def test_strided_conv_pads_like_torch():
  # torch pads a 7x7 stride-2 conv by 3 on every side, so the first output sees input rows/cols 0..3 (16 ones);
  # Flax 'SAME' would pad (2, 3) and see a 5x5 window (25 ones).
  conv = layers.conv(1, 7, 2)
  params = {"kernel": jnp.ones((7, 7, 1, 1))}
  y = conv.apply({"params": params}, jnp.ones((1, 8, 8, 1)))
  assert y.shape == (1, 4, 4, 1)
  assert float(y[0, 0, 0, 0]) == 16.0
  assert float(y[0, 3, 3, 0]) == 25.0  # rows/cols 3..7
  assert float(y[0, 1, 1, 0]) == 36.0  # rows/cols 0..5


def test_batchnorm_train_and_running_statistics_follow_torch():
  rng = np.random.default_rng(2)
  x = (rng.normal(size=(2, 4, 4, 3)) * 3 + 1).astype(np.float32)
  bn = layers.BatchNorm(momentum=0.1)
  variables = bn.init(jax.random.key(0), x, train=False)
  y, updates = bn.apply(variables, x, train=True, mutable=["batch_stats"])
  flat = x.reshape(-1, 3)
  np.testing.assert_allclose(y.reshape(-1, 3), (flat - flat.mean(0)) / np.sqrt(flat.var(0) + 1e-5), atol=1e-4)
  # torch moves the running variance towards the unbiased batch variance.
  np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.1 * flat.mean(0), rtol=1e-5)
  np.testing.assert_allclose(updates["batch_stats"]["var"], 0.9 + 0.1 * flat.var(0, ddof=1), rtol=1e-5)
  # Eval mode uses the running statistics.
  stats = {"mean": jnp.asarray([1.0, 2.0, 3.0]), "var": jnp.asarray([4.0, 1.0, 0.25])}
  params = {"scale": jnp.asarray([1.0, 2.0, 3.0]), "bias": jnp.asarray([0.0, 1.0, -1.0])}
  y = bn.apply({"params": params, "batch_stats": stats}, x, train=False)
  want = (x - np.array([1, 2, 3])) / np.sqrt(np.array([4, 1, 0.25]) + 1e-5) * np.array([1, 2, 3]) + np.array(
      [0, 1, -1])
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_upsample_nearest_and_bilinear():
  x = jnp.arange(2 * 3 * 4 * 2, dtype=jnp.float32).reshape(2, 3, 4, 2)
  np.testing.assert_array_equal(layers.upsample_nearest(x, 2), np.repeat(np.repeat(np.asarray(x), 2, 1), 2, 2))
  # Half-pixel bilinear x2 of [0, 1] is [0, 0.25, 0.75, 1] (torch align_corners=False, edges clamped).
  y = layers.resize_bilinear(jnp.asarray([0.0, 1.0]).reshape(1, 1, 2, 1), 1, 4)
  np.testing.assert_allclose(y.ravel(), [0, 0.25, 0.75, 1], atol=1e-6)


def test_spatial_size_check_names_the_fix():
  with pytest.raises(ValueError, match="divisible by 32.*96 x 64"):
    layers.check_spatial_size(jnp.zeros((1, 70, 64, 1)), 32, "U-Net")
  with pytest.raises(ValueError, match="NHWC"):
    layers.check_spatial_size(jnp.zeros((64, 64)), 32, "U-Net")
