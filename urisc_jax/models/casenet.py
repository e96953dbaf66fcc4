"""CASENet (Yu et al. 2017) edge network over a dilated ResNet, in two variants.

variant='original' (the CASENet paper; it used ResNet-101, the U-RISC paper ResNet-152):
  backbone with a stride-1 stem and dilated layer4 (strides: stem 1, layer1 2, layer2 4, layer3 8, layer4 8);
  side1 = 1x1 conv(stem -> 1); side2 = 1x1 conv(layer1 -> 1) + x2 transposed conv; side3 = 1x1 conv(layer2 -> 1) +
  x4 transposed conv; side5 = 1x1 conv(layer4 -> K) + x8 transposed conv (grouped per class). Transposed convs have
  kernel 2s, stride s, padding s/2 and start as bilinear interpolation. Fusion is "sliced concatenation": for each
  class k the stack [side5_k, side1, side2, side3] goes through its own 1x1 conv (a grouped 1x1 conv 4K -> K,
  weights initialized to 0.25). Deep supervision: side5 and the fused output.
variant='urisc' (the code the U-RISC benchmark trained):
  backbone with a deep stem (three 3x3 convs 64-64-128, stride 1) and dilated layer4; five sides from stem, layer1,
  layer2, layer3, layer4, each 1x1 conv -> K, BN, bilinear upsample to the input size; fusion: concatenate (5K),
  BN, 1x1 conv 5K -> K. Supervised on the fused output only.

Call: x [N, H, W, in_channels] (H, W divisible by 8) -> fused logits [N, H, W, K] float32. The side logits, each
[N, H, W, K] float32 at the input size, are sown into the 'intermediates' collection under 'side_logits':

    fused, state = model.apply(variables, x, train=True, mutable=["batch_stats", "intermediates"])
    sides = state["intermediates"]["side_logits"]   # original: (side5,); urisc: (side1, ..., side5)

For 'original' only side5 is sown since sides 1-3 are class-agnostic single-channel maps that the CASENet loss does
not supervise. Params tree: {'encoder', 'sides', 'fuse'} (+ 'fuse_bn' for 'urisc').
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from urisc_jax import platforms
from urisc_jax.models import layers
from urisc_jax.models import resnet

Dtype = Any

VARIANTS = ("original", "urisc")


def bilinear_kernel_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
  """A [k, k, Cin/groups, Cout] transposed-conv kernel that upsamples bilinearly (FCN's bilinear filler)."""
  del key
  k = shape[0]
  factor = (k + 1) // 2
  center = factor - 1 if k % 2 == 1 else factor - 0.5
  ramp = 1 - np.abs(np.arange(k) - center) / factor
  return jnp.broadcast_to(jnp.asarray(np.outer(ramp, ramp), dtype)[:, :, None, None], shape)


class UpsampledSide(nn.Module):
  """1x1 conv (bias) to `features`, then an optional x`factor` transposed conv: [N, h, w, C] -> [N, h*f, w*f, F]."""
  features: int
  factor: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = layers.conv(self.features, 1, use_bias=True, dtype=self.dtype, kernel_init=layers.decoder_conv_init,
                    name="conv")(x)
    if self.factor > 1:
      x = layers.ConvTranspose2d(self.features, kernel_size=2 * self.factor, stride=self.factor,
                                 padding=self.factor // 2, groups=self.features, use_bias=False, dtype=self.dtype,
                                 kernel_init=bilinear_kernel_init, name="deconv")(x)
    return x


class OriginalSides(nn.Module):
  """CASENet's sides at the input size: features -> side1, side2, side3 [N, H, W, 1] and side5 [N, H, W, K]."""
  num_classes: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
    stem, layer1, layer2, _, layer4 = features
    side1 = UpsampledSide(1, 1, dtype=self.dtype, name="side1")(stem)
    side2 = UpsampledSide(1, 2, dtype=self.dtype, name="side2")(layer1)
    side3 = UpsampledSide(1, 4, dtype=self.dtype, name="side3")(layer2)
    side5 = UpsampledSide(self.num_classes, 8, dtype=self.dtype, name="side5")(layer4)
    return side1, side2, side3, side5


# Strides of the features the U-RISC variant's sides read (stem, layer1 .. layer4; layer4 is dilated).
SIDE_STRIDES = (1, 2, 4, 8, 8)


class URiscSides(nn.Module):
  """Five sides (1x1 conv -> BN -> bilinear upsample), one per feature: features -> 5 x [N, H, W, K]."""
  num_classes: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: list[jax.Array], height: int, width: int, train: bool) -> list[jax.Array]:
    sides = []
    for i, feature in enumerate(features, start=1):
      side = layers.conv(self.num_classes, 1, dtype=self.dtype, kernel_init=layers.decoder_conv_init,
                         name=f"side{i}_conv")(feature)
      side = layers.BatchNorm(dtype=self.dtype, name=f"side{i}_bn")(side, train)
      if platforms.export_forms():
        # Exported graphs take symbolic H and W, which the size comparison below cannot decide: upsample by the
        # side's known stride in a form exporters map exactly (same values).
        side = layers.upsample_bilinear(side, SIDE_STRIDES[i - 1])
      elif side.shape[1:3] != (height, width):
        side = layers.resize_bilinear(side, height, width)
      sides.append(side)
    return sides


class CASENet(nn.Module):
  """CASENet: x [N, H, W, in_channels] -> fused logits [N, H, W, num_classes] float32 (H, W divisible by 8).

  Attributes:
    variant: 'original' (CASENet paper) or 'urisc' (the U-RISC benchmark's code); see the module docstring.
    encoder: ResNet depth, 'resnet152' as in the U-RISC paper ('resnet101' is the CASENet paper's).
    in_channels: channels of the input (1 for EM).
    num_classes: K, logits per pixel (1: membrane).
    width: channel multiplier of the backbone (1.0 is the published model).
    dtype: compute dtype (float32 or bfloat16); parameters stay float32 and logits are returned in float32.
  """
  variant: str = "urisc"
  encoder: str = "resnet152"
  in_channels: int = 1
  num_classes: int = 1
  width: float = 1.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if self.variant not in VARIANTS:
      raise ValueError(f"unknown CASENet variant {self.variant!r}; valid variants: {', '.join(VARIANTS)}")
    layers.check_spatial_size(x, INPUT_MULTIPLE, f"CASENet-{self.encoder}")
    height, width = x.shape[1], x.shape[2]
    features = resnet.ResNet(
        self.encoder, self.in_channels, self.width, stem_stride=1, deep_stem=self.variant == "urisc",
        replace_stride_with_dilation=(False, False, True), dtype=self.dtype, name="encoder")(x, train)
    k = self.num_classes
    if self.variant == "original":
      side1, side2, side3, side5 = OriginalSides(k, dtype=self.dtype, name="sides")(features)
      # Sliced concatenation: class k sees [side5_k, side1, side2, side3], channels ordered class by class.
      shared = jnp.concatenate([side1, side2, side3], axis=-1)
      stacked = jnp.concatenate(
          [side5[..., None], jnp.broadcast_to(shared[..., None, :], side5.shape + (3,))], axis=-1)
      stacked = stacked.reshape(side5.shape[:-1] + (4 * k,))
      fused = layers.Conv2d(k, 1, groups=k, use_bias=True, dtype=self.dtype,
                            kernel_init=nn.initializers.constant(0.25), name="fuse")(stacked)
      sides = [side5]
    else:
      sides = URiscSides(k, dtype=self.dtype, name="sides")(features, height, width, train)
      fused = layers.BatchNorm(dtype=self.dtype, name="fuse_bn")(jnp.concatenate(sides, axis=-1), train)
      fused = layers.conv(k, 1, use_bias=True, dtype=self.dtype, kernel_init=layers.head_conv_init,
                          name="fuse")(fused)
    for side in sides:
      self.sow("intermediates", "side_logits", side.astype(jnp.float32))
    return fused.astype(jnp.float32)


# Input height and width must be multiples of this: the deepest feature map has H / 8 rows.
INPUT_MULTIPLE = 8
MODEL_CLASS = CASENet
