"""ResNet encoders 18/34/50/101/152 in the torchvision v1.5 layout, returning the features a decoder needs.

torchvision v1.5: the stride of a bottleneck sits on its 3x3 convolution, the projection shortcut is a strided 1x1
conv + BN. Parameter and batch-statistic names mirror torchvision's so imported weights map one to one:

    conv1, bn1                                      (stem; `deep_stem` uses stem_conv{1,2,3}, stem_bn{1,2,3})
    layer{1..4}/block{j}/conv{1,2[,3]}, bn{1,2[,3]}, downsample_conv, downsample_bn

Options beyond torchvision: `in_channels` (any, e.g. 1 for EM), `width` (channel multiplier for tiny models),
`stem_stride` 1 (CASENet keeps full resolution in the stem), `deep_stem` (three 3x3 convs, 64-64-128 channels), and
torchvision's `replace_stride_with_dilation` for layers 2-4 (dilated, output stride 16 or 8).
"""

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from urisc_jax.models import layers

Dtype = Any


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
  """Depth of a torchvision ResNet: block type and number of blocks in layer1..layer4."""
  bottleneck: bool
  blocks: tuple[int, int, int, int]


ENCODERS = {
    "resnet18": EncoderSpec(bottleneck=False, blocks=(2, 2, 2, 2)),
    "resnet34": EncoderSpec(bottleneck=False, blocks=(3, 4, 6, 3)),
    "resnet50": EncoderSpec(bottleneck=True, blocks=(3, 4, 6, 3)),
    "resnet101": EncoderSpec(bottleneck=True, blocks=(3, 4, 23, 3)),
    "resnet152": EncoderSpec(bottleneck=True, blocks=(3, 8, 36, 3)),
}

STAGE_PLANES = (64, 128, 256, 512)


def encoder_spec(name: str) -> EncoderSpec:
  """The EncoderSpec of `name`, or a ValueError listing the valid names."""
  if name not in ENCODERS:
    raise ValueError(f"unknown encoder {name!r}; valid encoders: {', '.join(ENCODERS)}")
  return ENCODERS[name]


def feature_channels(name: str, width: float = 1.0, deep_stem: bool = False) -> tuple[int, ...]:
  """Channels of the five features ResNet returns (stem, layer1..layer4), e.g. (64, 256, 512, 1024, 2048)."""
  spec = encoder_spec(name)
  expansion = 4 if spec.bottleneck else 1
  stem = layers.scaled_channels(128 if deep_stem else 64, width)
  return (stem,) + tuple(layers.scaled_channels(p, width) * expansion for p in STAGE_PLANES)


class BasicBlock(nn.Module):
  """Two 3x3 convs with an identity or projected shortcut (ResNet-18/34): [N, H, W, C] -> [N, H/s, W/s, planes]."""
  planes: int
  stride: int = 1
  dilation: int = 1
  first_dilation: int = 1
  project: bool = False
  dtype: Dtype = jnp.float32

  expansion = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    shortcut = x
    # torchvision refuses dilated BasicBlocks; this follows the usual extension: the first conv of the first block
    # of a dilated stage keeps the previous stage's dilation, every other conv uses the stage's.
    y = layers.conv(self.planes, 3, self.stride, self.first_dilation, dtype=self.dtype, name="conv1")(x)
    y = nn.relu(layers.BatchNorm(dtype=self.dtype, name="bn1")(y, train))
    y = layers.conv(self.planes, 3, 1, self.dilation, dtype=self.dtype, name="conv2")(y)
    y = layers.BatchNorm(dtype=self.dtype, name="bn2")(y, train)
    if self.project:
      shortcut = layers.conv(self.planes, 1, self.stride, dtype=self.dtype, name="downsample_conv")(x)
      shortcut = layers.BatchNorm(dtype=self.dtype, name="downsample_bn")(shortcut, train)
    return nn.relu(y + shortcut)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (strided, dilated) -> 1x1 (x4 channels) with a shortcut: [N, H, W, C] -> [N, H/s, W/s, 4*planes]."""
  planes: int
  stride: int = 1
  dilation: int = 1
  first_dilation: int = 1
  project: bool = False
  dtype: Dtype = jnp.float32

  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    shortcut = x
    y = layers.conv(self.planes, 1, dtype=self.dtype, name="conv1")(x)
    y = nn.relu(layers.BatchNorm(dtype=self.dtype, name="bn1")(y, train))
    # torchvision gives the first block of a dilated stage the previous stage's dilation (first_dilation).
    y = layers.conv(self.planes, 3, self.stride, self.first_dilation, dtype=self.dtype, name="conv2")(y)
    y = nn.relu(layers.BatchNorm(dtype=self.dtype, name="bn2")(y, train))
    y = layers.conv(self.planes * 4, 1, dtype=self.dtype, name="conv3")(y)
    y = layers.BatchNorm(dtype=self.dtype, name="bn3")(y, train)
    if self.project:
      shortcut = layers.conv(self.planes * 4, 1, self.stride, dtype=self.dtype, name="downsample_conv")(x)
      shortcut = layers.BatchNorm(dtype=self.dtype, name="downsample_bn")(shortcut, train)
    return nn.relu(y + shortcut)


class ResNetStage(nn.Module):
  """One of layer1..layer4: `blocks` residual blocks, the first one strided and projecting the shortcut."""
  block_cls: Any
  planes: int
  blocks: int
  stride: int = 1
  dilation: int = 1
  previous_dilation: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    out_channels = self.planes * self.block_cls.expansion
    for j in range(self.blocks):
      first = j == 0
      x = self.block_cls(
          self.planes,
          stride=self.stride if first else 1,
          dilation=self.dilation,
          first_dilation=self.previous_dilation if first else self.dilation,
          project=first and (self.stride != 1 or x.shape[-1] != out_channels),
          dtype=self.dtype,
          name=f"block{j}",
      )(x, train)
    return x


class ResNet(nn.Module):
  """ResNet feature extractor without pooling head and fc.

  Call: x [N, H, W, in_channels] -> list of 5 features [stem, layer1, layer2, layer3, layer4]; with the default
  stride-2 stem they are at strides 2, 4, 8, 16, 32 and have `feature_channels(name, width, deep_stem)` channels.
  The stem feature is taken after its ReLU, before the max-pool (what segmentation_models_pytorch's U-Net skips).
  The input's channel count is whatever x has; `in_channels` is only checked against it.
  """
  arch: str = "resnet50"
  in_channels: int | None = None
  width: float = 1.0
  stem_stride: int = 2
  deep_stem: bool = False
  replace_stride_with_dilation: Sequence[bool] = (False, False, False)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> list[jax.Array]:
    spec = encoder_spec(self.arch)
    if self.in_channels is not None and x.shape[-1] != self.in_channels:
      raise ValueError(f"{self.arch} encoder built for {self.in_channels} input channels got an input of shape "
                       f"{x.shape} (NHWC)")
    if len(self.replace_stride_with_dilation) != 3:
      raise ValueError("replace_stride_with_dilation needs 3 booleans (layer2, layer3, layer4), got "
                       f"{self.replace_stride_with_dilation}")
    block_cls = Bottleneck if spec.bottleneck else BasicBlock
    x = x.astype(self.dtype)
    stem_channels = layers.scaled_channels(64, self.width)
    if self.deep_stem:
      for i, (channels, stride) in enumerate(
          [(stem_channels, self.stem_stride), (stem_channels, 1), (2 * stem_channels, 1)], start=1):
        x = layers.conv(channels, 3, stride, dtype=self.dtype, name=f"stem_conv{i}")(x)
        x = nn.relu(layers.BatchNorm(dtype=self.dtype, name=f"stem_bn{i}")(x, train))
    else:
      x = layers.conv(stem_channels, 7, self.stem_stride, dtype=self.dtype, name="conv1")(x)
      x = nn.relu(layers.BatchNorm(dtype=self.dtype, name="bn1")(x, train))
    features = [x]
    # torch's MaxPool2d(3, 2, padding=1) pads with -inf, as reduce_window's max does.
    x = layers.max_pool2d(x, 3, 2, 1)

    dilation = 1
    stage_strides = (1, 2, 2, 2)
    dilate = (False,) + tuple(self.replace_stride_with_dilation)
    for stage, (planes, blocks, stride, use_dilation) in enumerate(
        zip(STAGE_PLANES, spec.blocks, stage_strides, dilate), start=1):
      previous_dilation = dilation
      if use_dilation:
        dilation *= stride
        stride = 1
      x = ResNetStage(block_cls, layers.scaled_channels(planes, self.width), blocks, stride, dilation,
                      previous_dilation, dtype=self.dtype, name=f"layer{stage}")(x, train)
      features.append(x)
    return features
