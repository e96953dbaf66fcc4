"""The plain U-Net of Ronneberger et al. 2015: 23 convolutions, 64 .. 1024 channels, no pretrained encoder.

Contracting path: four levels of two 3x3 convs (64, 128, 256, 512 channels) each followed by a 2x2 max-pool, and a
bottom level of two 3x3 convs at 1024 channels (10 convs). Expanding path: four levels of a 2x2 "up-convolution"
(transposed conv, stride 2) that halves the channels, concatenation with the contracting path's feature, and two
3x3 convs (12 convs). Head: 1x1 conv to the logits (1 conv): 23 in all.

Unlike the 2015 paper the 3x3 convs pad by one pixel ('SAME'), so the output has the input's size and no cropping is
needed; `batch_norm=True` (default) puts a BatchNorm after every 3x3 conv as most current implementations do, and
`batch_norm=False` gives the paper's conv (with bias) -> ReLU. Input H and W must be divisible by 16.

Params tree: {'encoder': {'block0'..'block4': {'conv1', 'conv2'}}, 'decoder': {'block0'..'block3': {'up',
'double_conv'}}, 'head'}.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from urisc_jax.models import layers

Dtype = Any

LEVEL_CHANNELS = (64, 128, 256, 512, 1024)


class DoubleConv(nn.Module):
  """Two 3x3 conv (-> BN) -> ReLU: [N, H, W, C] -> [N, H, W, features]."""
  features: int
  batch_norm: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for i in (1, 2):
      if self.batch_norm:
        x = layers.ConvBNReLU(self.features, 3, dtype=self.dtype, kernel_init=layers.decoder_conv_init,
                              name=f"conv{i}")(x, train)
      else:
        x = nn.relu(layers.conv(self.features, 3, use_bias=True, dtype=self.dtype,
                                kernel_init=layers.decoder_conv_init, name=f"conv{i}")(x))
    return x


class PlainUNetEncoder(nn.Module):
  """Contracting path: x -> [level0 (H), level1 (H/2), level2 (H/4), level3 (H/8), bottom (H/16)]."""
  channels: tuple[int, ...] = LEVEL_CHANNELS
  batch_norm: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> list[jax.Array]:
    features = []
    for i, channels in enumerate(self.channels):
      if i:
        x = layers.max_pool2d(x, 2, 2)
      x = DoubleConv(channels, self.batch_norm, dtype=self.dtype, name=f"block{i}")(x, train)
      features.append(x)
    return features


class PlainUNetDecoderBlock(nn.Module):
  """2x2 up-conv halving channels, concat the skip, DoubleConv: [N, H, W, C] -> [N, 2H, 2W, features]."""
  features: int
  batch_norm: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, skip: jax.Array, train: bool) -> jax.Array:
    x = layers.ConvTranspose2d(self.features, kernel_size=2, stride=2, padding=0, dtype=self.dtype, name="up")(x)
    x = jnp.concatenate([skip.astype(x.dtype), x], axis=-1)
    return DoubleConv(self.features, self.batch_norm, dtype=self.dtype, name="double_conv")(x, train)


class PlainUNetDecoder(nn.Module):
  """Expanding path: encoder features [l0, l1, l2, l3, bottom] -> [N, H, W, channels[0]]."""
  channels: tuple[int, ...] = LEVEL_CHANNELS[:-1]
  batch_norm: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: list[jax.Array], train: bool) -> jax.Array:
    x = features[-1]
    for i, (channels, skip) in enumerate(zip(self.channels[::-1], features[-2::-1])):
      x = PlainUNetDecoderBlock(channels, self.batch_norm, dtype=self.dtype, name=f"block{i}")(x, skip, train)
    return x


class PlainUNet(nn.Module):
  """Plain U-Net: x [N, H, W, in_channels] -> logits [N, H, W, num_classes] float32 (H, W divisible by 16).

  Attributes:
    in_channels: channels of the input (1 for EM).
    num_classes: logits per pixel (1: membrane).
    width: channel multiplier (1.0: 64 .. 1024 channels).
    batch_norm: BatchNorm after each 3x3 conv (False: the 2015 paper's conv with bias -> ReLU).
    dtype: compute dtype (float32 or bfloat16); parameters stay float32 and logits are returned in float32.
  """
  in_channels: int = 1
  num_classes: int = 1
  width: float = 1.0
  batch_norm: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    layers.check_spatial_size(x, INPUT_MULTIPLE, "plain U-Net")
    if x.shape[-1] != self.in_channels:
      raise ValueError(f"plain U-Net built for {self.in_channels} input channels got an input of shape {x.shape}")
    channels = tuple(layers.scaled_channels(c, self.width) for c in LEVEL_CHANNELS)
    encoder = PlainUNetEncoder(channels, self.batch_norm, dtype=self.dtype, name="encoder")
    features = encoder(x.astype(self.dtype), train)
    x = PlainUNetDecoder(channels[:-1], self.batch_norm, dtype=self.dtype, name="decoder")(features, train)
    x = layers.conv(self.num_classes, 1, use_bias=True, dtype=self.dtype, kernel_init=layers.head_conv_init,
                    name="head")(x)
    return x.astype(jnp.float32)


# Input height and width must be multiples of this: the deepest feature map has H / 16 rows.
INPUT_MULTIPLE = 16
MODEL_CLASS = PlainUNet
