"""U-Net over a ResNet encoder, as segmentation_models_pytorch builds it (the paper's U-Net-ResNet50).

Decoder (channels (256, 128, 64, 32, 16) at width 1): five blocks, each: nearest x2 upsample, concatenate the
encoder skip at that stride (layer3, layer2, layer1, stem; none for the last), then [3x3 conv (no bias) - BN -
ReLU] x 2. Head: 3x3 conv with bias to `num_classes` logits. For resnet50 the block inputs are
[2048, 256, 128, 64, 32] with skips [1024, 512, 256, 64, 0]. At in_channels = num_classes = 1 the parameter count is
32,514,833 (encoder 23,501,760, decoder 9,012,928, head 145), as smp's.

The upsampling and the concatenation are not materialized: each block's first conv runs the skip's part at the
skip's resolution and the upsampled part at the low resolution (`layers.UpsampleConcatConv`), the same function
and parameters with 16/36 of the upsampled part's multiply-adds.

Params tree: {'encoder': ResNet params, 'decoder': {'block0'..'block4': {'conv1', 'conv2'}}, 'head': {...}}.
Input H and W must be divisible by 32.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from urisc_jax.models import layers
from urisc_jax.models import resnet

Dtype = Any


class UNetDecoderBlock(nn.Module):
  """Upsample x2, concatenate the skip, two 3x3 conv-BN-ReLU: [N, H, W, C] (+ skip [N, 2H, 2W, S]) -> [N, 2H, 2W, F]."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, skip: jax.Array | None, train: bool) -> jax.Array:
    x = UpsampleConcatConvBNReLU(self.features, dtype=self.dtype, name="conv1")(x, skip, train)
    return layers.ConvBNReLU(self.features, 3, dtype=self.dtype, kernel_init=layers.decoder_conv_init,
                             name="conv2")(x, train)


class UpsampleConcatConvBNReLU(nn.Module):
  """A decoder block's first conv-BN-ReLU with the upsampling and the concatenation folded into the conv
  (`layers.UpsampleConcatConv`); its parameters are those of a ConvBNReLU on the concatenation."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, skip: jax.Array | None, train: bool) -> jax.Array:
    x = layers.UpsampleConcatConv(self.features, dtype=self.dtype, name="conv")(x, skip)
    return nn.relu(layers.BatchNorm(dtype=self.dtype, name="bn")(x, train))


class UNetDecoder(nn.Module):
  """Five UNetDecoderBlocks from the deepest feature up: features [stem, l1, l2, l3, l4] -> [N, H, W, channels[-1]]."""
  channels: Sequence[int] = (256, 128, 64, 32, 16)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[jax.Array], train: bool) -> jax.Array:
    x = features[-1]
    skips = list(features[:-1])[::-1]  # layer3, layer2, layer1, stem
    for i, out_channels in enumerate(self.channels):
      skip = skips[i] if i < len(skips) else None
      x = UNetDecoderBlock(out_channels, dtype=self.dtype, name=f"block{i}")(x, skip, train)
    return x


class UNet(nn.Module):
  """U-Net-ResNet: x [N, H, W, in_channels] float -> logits [N, H, W, num_classes] float32 (H, W divisible by 32).

  Attributes:
    encoder: 'resnet18', 'resnet34', 'resnet50' (the paper's), 'resnet101' or 'resnet152'.
    in_channels: channels of the input (1 for EM).
    num_classes: logits per pixel (1: membrane).
    width: channel multiplier for encoder and decoder (1.0 is the published model; 0.125 makes a tiny one).
    decoder_channels: decoder block widths at width 1.
    dtype: compute dtype (float32 or bfloat16); parameters stay float32 and logits are returned in float32.
  """
  encoder: str = "resnet50"
  in_channels: int = 1
  num_classes: int = 1
  width: float = 1.0
  decoder_channels: Sequence[int] = (256, 128, 64, 32, 16)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    layers.check_spatial_size(x, INPUT_MULTIPLE, f"U-Net-{self.encoder}")
    features = resnet.ResNet(self.encoder, self.in_channels, self.width, dtype=self.dtype, name="encoder")(x, train)
    channels = [layers.scaled_channels(c, self.width) for c in self.decoder_channels]
    x = UNetDecoder(channels, dtype=self.dtype, name="decoder")(features, train)
    x = layers.conv(self.num_classes, 3, use_bias=True, dtype=self.dtype, kernel_init=layers.head_conv_init,
                    name="head")(x)
    return x.astype(jnp.float32)


# Input height and width must be multiples of this: the deepest feature map has H / 32 rows.
INPUT_MULTIPLE = 32
MODEL_CLASS = UNet
