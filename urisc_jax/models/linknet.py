"""LinkNet over a ResNet encoder, as segmentation_models_pytorch builds it (the paper's LinkNet-ResNet18).

Decoder for resnet18 (width 1): 512 -> 256 -> 128 -> 64 -> 64 -> 32, five blocks, each: 1x1 conv to in/4 - BN -
ReLU, transposed conv (kernel 4, stride 2, padding 1, with bias) - BN - ReLU, 1x1 conv to out - BN - ReLU, then add
the encoder skip at that stride (layer3, layer2, layer1, stem; none for the last). Head: 1x1 conv with bias.
At in_channels = num_classes = 1: LinkNet-ResNet18 11,657,505 parameters (decoder 487,232, head 33),
LinkNet-ResNet50 31,171,505, as smp's.

Params tree: {'encoder': ResNet params, 'decoder': {'block0'..'block4': {'reduce', 'deconv', 'deconv_bn',
'expand'}}, 'head': {...}}. Input H and W must be divisible by 32.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from urisc_jax.models import layers
from urisc_jax.models import resnet

Dtype = Any


class LinkNetDecoderBlock(nn.Module):
  """1x1 reduce, x2 transposed conv, 1x1 expand (each with BN-ReLU), + skip: [N, H, W, C] -> [N, 2H, 2W, F]."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, skip: jax.Array | None, train: bool) -> jax.Array:
    middle = x.shape[-1] // 4
    x = layers.ConvBNReLU(middle, 1, dtype=self.dtype, kernel_init=layers.decoder_conv_init, name="reduce")(x, train)
    x = layers.ConvTranspose2d(middle, kernel_size=4, stride=2, padding=1, dtype=self.dtype, name="deconv")(x)
    x = nn.relu(layers.BatchNorm(dtype=self.dtype, name="deconv_bn")(x, train))
    x = layers.ConvBNReLU(self.features, 1, dtype=self.dtype, kernel_init=layers.decoder_conv_init,
                          name="expand")(x, train)
    if skip is not None:
      x = x + skip.astype(x.dtype)
    return x


class LinkNetDecoder(nn.Module):
  """Five LinkNetDecoderBlocks: features [stem, l1, l2, l3, l4] -> [N, H, W, prefinal_channels]."""
  prefinal_channels: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[jax.Array], train: bool) -> jax.Array:
    x = features[-1]
    skips = list(features[:-1])[::-1]  # layer3, layer2, layer1, stem
    # Each block returns the channels of the skip it adds; the last one returns prefinal_channels.
    out_channels = [s.shape[-1] for s in skips] + [self.prefinal_channels]
    for i, channels in enumerate(out_channels):
      skip = skips[i] if i < len(skips) else None
      x = LinkNetDecoderBlock(channels, dtype=self.dtype, name=f"block{i}")(x, skip, train)
    return x


class LinkNet(nn.Module):
  """LinkNet-ResNet: x [N, H, W, in_channels] float -> logits [N, H, W, num_classes] float32 (H, W divisible by 32).

  Attributes:
    encoder: 'resnet18' (the paper's), 'resnet34', 'resnet50', 'resnet101' or 'resnet152'.
    in_channels: channels of the input (1 for EM).
    num_classes: logits per pixel (1: membrane).
    width: channel multiplier for encoder and decoder (1.0 is the published model; 0.25 makes a small one).
    prefinal_channels: channels before the head at width 1.
    dtype: compute dtype (float32 or bfloat16); parameters stay float32 and logits are returned in float32.
  """
  encoder: str = "resnet18"
  in_channels: int = 1
  num_classes: int = 1
  width: float = 1.0
  prefinal_channels: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    layers.check_spatial_size(x, INPUT_MULTIPLE, f"LinkNet-{self.encoder}")
    features = resnet.ResNet(self.encoder, self.in_channels, self.width, dtype=self.dtype, name="encoder")(x, train)
    x = LinkNetDecoder(layers.scaled_channels(self.prefinal_channels, self.width), dtype=self.dtype,
                       name="decoder")(features, train)
    x = layers.conv(self.num_classes, 1, use_bias=True, dtype=self.dtype, kernel_init=layers.head_conv_init,
                    name="head")(x)
    return x.astype(jnp.float32)


# Input height and width must be multiples of this: the deepest feature map has H / 32 rows.
INPUT_MULTIPLE = 32
MODEL_CLASS = LinkNet
