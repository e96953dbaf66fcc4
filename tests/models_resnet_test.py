"""Tests of the ResNet encoders: torchvision parameter counts, feature strides, dilation, width."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from urisc_jax import models
from urisc_jax.models import resnet


def _abstract(encoder, input_shape=(1, 64, 64, 1), **kwargs):
  module = resnet.ResNet(encoder, **kwargs)
  x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
  variables = jax.eval_shape(lambda x: module.init(jax.random.key(0), x, train=False), x)
  features = jax.eval_shape(lambda v, x: module.apply(v, x, train=False), variables, x)
  return variables, features


# torchvision's resnet{18,34,50,101,152}().parameters() without fc, with conv1 for one input channel
# (3 * 64 * 49 - 64 * 49 = 6,272 fewer than the RGB model).
@pytest.mark.parametrize("encoder,count", [
    ("resnet18", 11_170_240),
    ("resnet34", 21_278_400),
    ("resnet50", 23_501_760),
    ("resnet101", 42_493_888),
    ("resnet152", 58_137_536),
])
def test_parameter_counts_match_torchvision(encoder, count):
  variables, _ = _abstract(encoder, in_channels=1)
  assert models.count_params(variables["params"]) == count


def test_rgb_stem_matches_torchvision_resnet50():
  # torchvision resnet50: 25,557,032 parameters of which fc holds 2048 * 1000 + 1000.
  variables, _ = _abstract("resnet50", input_shape=(1, 64, 64, 3), in_channels=3)
  assert models.count_params(variables) == 25_557_032 - 2_049_000


def test_batch_stats_follow_torchvision_names():
  variables, _ = _abstract("resnet50")
  stats = variables["batch_stats"]
  assert set(stats) == {"bn1", "layer1", "layer2", "layer3", "layer4"}
  assert set(stats["layer1"]["block0"]) == {"bn1", "bn2", "bn3", "downsample_bn"}
  assert "downsample_bn" not in stats["layer1"]["block1"]
  assert stats["layer4"]["block2"]["bn3"]["var"].shape == (2048,)
  assert variables["params"]["layer2"]["block0"]["conv2"]["kernel"].shape == (3, 3, 128, 128)
  assert variables["params"]["conv1"]["kernel"].shape == (7, 7, 1, 64)


@pytest.mark.parametrize("encoder,channels", [
    ("resnet18", (64, 64, 128, 256, 512)),
    ("resnet50", (64, 256, 512, 1024, 2048)),
])
def test_feature_shapes_and_strides(encoder, channels):
  _, features = _abstract(encoder, input_shape=(2, 64, 96, 1))
  assert [f.shape for f in features] == [(2, 64 // s, 96 // s, c) for s, c in zip((2, 4, 8, 16, 32), channels)]
  assert resnet.feature_channels(encoder) == channels


def test_dilation_keeps_parameters_and_sets_output_stride():
  plain, _ = _abstract("resnet50")
  dilated, features = _abstract("resnet50", replace_stride_with_dilation=(False, True, True))
  assert models.count_params(dilated) == models.count_params(plain)
  assert [f.shape[1] for f in features] == [32, 16, 8, 8, 8]
  _, features = _abstract("resnet18", stem_stride=1, replace_stride_with_dilation=(False, False, True))
  assert [f.shape[1] for f in features] == [64, 32, 16, 8, 8]


def test_width_and_deep_stem():
  variables, features = _abstract("resnet50", width=0.125)
  assert variables["params"]["conv1"]["kernel"].shape == (7, 7, 1, 8)
  assert features[-1].shape[-1] == 256 == resnet.feature_channels("resnet50", 0.125)[-1]
  variables, features = _abstract("resnet18", width=0.25, deep_stem=True, stem_stride=1)
  assert {"stem_conv1", "stem_conv2", "stem_conv3"} <= set(variables["params"])
  assert features[0].shape == (1, 64, 64, 32)


def test_identity_block_is_relu_when_its_last_bn_is_zero():
  # A residual block whose last BN has scale 0 and bias 0 adds nothing: out = relu(x).
  block = resnet.Bottleneck(planes=2)
  x = jax.random.normal(jax.random.key(1), (1, 8, 8, 8))
  variables = jax.jit(lambda x: block.init(jax.random.key(0, impl="rbg"), x, train=False))(x)
  params = jax.tree.map(lambda a: a, variables["params"])
  params["bn3"] = {"scale": jnp.zeros(8), "bias": jnp.zeros(8)}
  y = jax.jit(lambda v, x: block.apply(v, x, train=False))(
      {"params": params, "batch_stats": variables["batch_stats"]}, x)
  np.testing.assert_allclose(y, jax.nn.relu(x), atol=1e-6)


def test_errors_name_the_fix():
  with pytest.raises(ValueError, match="valid encoders: resnet18, resnet34, resnet50"):
    resnet.encoder_spec("resnet42")
  with pytest.raises(ValueError, match="built for 1 input channels"):
    _abstract("resnet18", input_shape=(1, 64, 64, 3), in_channels=1)
