"""Building blocks shared by the models, written to match PyTorch numerics.

The models load PyTorch weights (torchvision ResNets, CEM500K MoCoV2), so every layer here follows torch's
conventions rather than Flax's defaults:

- paddings are explicit (Flax 'SAME' pads stride-2 convolutions on the other side than torch does);
- convolutions, transposed convolutions and "x2 nearest upsampling then 3x3 conv" are plain XLA convolutions on GPUs
  and TPUs, and on the CPU take the forms XLA:CPU runs fastest (1x1 convolutions as matrix products, transposed
  convolutions over their output phases, the upsampling folded into 2x2 phase kernels, swapped weight gradients):
  `conv2d`, `conv_transpose2d` and `upsample2_conv3x3` choose per backend through `platforms.per_backend`, and their
  `*_cpu` twins are the CPU forms (same results);
- `BatchNorm` uses torch's epsilon and momentum and updates the running variance with the unbiased estimate, so
  training from imported statistics moves them the way torch would;
- `ConvTranspose2d` reproduces torch's `ConvTranspose2d(kernel, stride, padding)` output size and alignment.

All layers keep parameters in float32 and compute in `dtype`. Arrays are NHWC.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from urisc_jax import platforms
from urisc_jax.models import cpu_convolution

Dtype = Any

# He-normal over fan-out: torchvision's ResNet initialization (kaiming_normal_, mode='fan_out').
resnet_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# He-uniform over fan-in: segmentation_models_pytorch's decoder initialization (kaiming_uniform_, mode='fan_in').
decoder_conv_init = nn.initializers.variance_scaling(2.0, "fan_in", "uniform")
# Xavier-uniform: segmentation_models_pytorch's head initialization.
head_conv_init = nn.initializers.xavier_uniform()


def scaled_channels(channels: int, width: float) -> int:
  """Channel count under a width multiplier (width=0.125 turns a 64-channel stem into 8 channels)."""
  return max(1, int(round(channels * width)))


def conv2d(x: jax.Array, kernel: jax.Array, stride: int = 1, padding: int = 0, dilation: int = 1,
           groups: int = 1) -> jax.Array:
  """torch's Conv2d(stride, padding, dilation, groups) on NHWC: x [N, H, W, Cin], kernel [k, k, Cin/groups, Cout].

  A plain XLA convolution on GPUs and TPUs; on the CPU `conv2d_cpu`'s form where it has one.
  """
  plain = functools.partial(plain_conv2d, stride=stride, padding=padding, dilation=dilation, groups=groups)
  if not _has_cpu_form(kernel.shape, stride, padding, dilation, groups):
    return plain(x, kernel)
  cpu = functools.partial(conv2d_cpu, stride=stride, padding=padding, dilation=dilation, groups=groups)
  return platforms.per_backend(cpu=cpu, accelerator=plain)(x, kernel)


def plain_conv2d(x: jax.Array, kernel: jax.Array, stride: int = 1, padding: int = 0, dilation: int = 1,
                 groups: int = 1) -> jax.Array:
  """`conv2d` as one `lax.conv_general_dilated`: what GPUs and TPUs run (cuDNN, the TPU's convolution units)."""
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(stride, stride), padding=((padding, padding), (padding, padding)),
      rhs_dilation=(dilation, dilation), dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)


def _is_pixelwise(kernel_shape, padding: int, groups: int) -> bool:
  return tuple(kernel_shape[:2]) == (1, 1) and groups == 1 and padding == 0


def _has_swapped_gradient(kernel_shape, stride: int, padding: int, dilation: int, groups: int) -> bool:
  return stride == 1 and dilation == 1 and groups == 1 and padding < kernel_shape[0]


def _has_cpu_form(kernel_shape, stride: int, padding: int, dilation: int, groups: int) -> bool:
  return (_is_pixelwise(kernel_shape, padding, groups)
          or _has_swapped_gradient(kernel_shape, stride, padding, dilation, groups))


def conv2d_cpu(x: jax.Array, kernel: jax.Array, stride: int = 1, padding: int = 0, dilation: int = 1,
               groups: int = 1) -> jax.Array:
  """`conv2d` in the forms XLA:CPU runs fastest: 1x1 convolutions as one matrix product (`_pixelwise_matmul`),
  stride-1 ones with the swapped weight gradient (`cpu_convolution`), the rest as `plain_conv2d`."""
  if _is_pixelwise(kernel.shape, padding, groups):
    return _pixelwise_matmul(x[:, ::stride, ::stride], kernel[0, 0])
  if _has_swapped_gradient(kernel.shape, stride, padding, dilation, groups):
    return cpu_convolution.conv2d_stride1_cpu(x, kernel, padding)
  return plain_conv2d(x, kernel, stride, padding, dilation, groups)


def _pixelwise_matmul(x: jax.Array, matrix: jax.Array) -> jax.Array:
  """A 1x1 convolution as one matrix product: x [N, H, W, Cin] @ matrix [Cin, Cout] -> [N, H, W, Cout].

  Why not lax.conv: its weight gradient is a convolution with an H x W window whose operands XLA's CPU backend first
  transposes (batch as the minor dimension), recomputing the elementwise producers (BatchNorm, ReLU, the residual
  sums) inside each transpose. As a 2-D product, the weight gradient is x^T @ dy over the same row-major memory, which
  the matrix kernels read without a copy: a U-Net-ResNet50 train step at 512^2 is about 10 % faster on CPU.
  """
  n, h, w, channels = x.shape
  y = jax.lax.dot_general(x.reshape(n * h * w, channels), matrix, (((1,), (0,)), ((), ())))
  return y.reshape(n, h, w, matrix.shape[1])


class Conv2d(nn.Module):
  """A 2-D convolution with torch's explicit symmetric padding: [N, H, W, Cin] -> [N, H/stride, W/stride, features].

  Parameters as Flax's nn.Conv names them: 'kernel' [k, k, Cin/groups, features] (HWIO, i.e. torch's OIHW weight
  transposed by (2, 3, 1, 0)) and, with `use_bias`, 'bias' [features]; float32, computed in `dtype`.
  """
  features: int
  kernel_size: int = 3
  stride: int = 1
  dilation: int = 1
  groups: int = 1
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  kernel_init: Any = resnet_conv_init
  bias_init: Any = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = _grouped_kernel(self, x.shape[-1])
    pad = self.dilation * (self.kernel_size - 1) // 2
    y = conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, pad, self.dilation, self.groups)
    return _add_bias(self, y)


def _grouped_kernel(module, in_channels: int) -> jax.Array:
  """Declares a (grouped) convolution module's float32 'kernel' [k, k, in_channels / groups, features]."""
  if in_channels % module.groups or module.features % module.groups:
    raise ValueError(f"{type(module).__name__}: channels {in_channels} -> {module.features} not divisible by groups "
                     f"{module.groups}")
  k = module.kernel_size
  return module.param("kernel", module.kernel_init, (k, k, in_channels // module.groups, module.features),
                      jnp.float32)


def _add_bias(module, y: jax.Array) -> jax.Array:
  """y + the module's float32 'bias' [features] where it has `use_bias`, in the module's compute dtype."""
  if not module.use_bias:
    return y
  return y + module.param("bias", module.bias_init, (module.features,), jnp.float32).astype(module.dtype)


def conv(features: int, kernel_size: int = 3, stride: int = 1, dilation: int = 1, *, use_bias: bool = False,
         dtype: Dtype = jnp.float32, kernel_init: Any = resnet_conv_init, name: str | None = None) -> Conv2d:
  """A `Conv2d` with torch's symmetric padding ('same' size at stride 1 for odd kernels)."""
  return Conv2d(features, kernel_size, stride, dilation, use_bias=use_bias, dtype=dtype, kernel_init=kernel_init,
                name=name)


class BatchNorm(nn.Module):
  """Batch normalization over N, H, W with torch's conventions.

  Parameters `scale`, `bias` (params) and `mean`, `var` (batch_stats) are float32 vectors of length C.
  Train mode normalizes with the batch's biased variance and moves the running variance towards the unbiased one,
  as torch.nn.BatchNorm2d does; eval mode uses the running statistics. `momentum` is torch's (weight of the new
  batch). Under `jax.jit` with a batch sharded over devices the means are global (XLA reduces across devices).
  """
  momentum: float = 0.1
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    channels = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
    running_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((channels,), jnp.float32))
    running_var = self.variable("batch_stats", "var", lambda: jnp.ones((channels,), jnp.float32))
    if train:
      axes = tuple(range(x.ndim - 1))
      # float32 statistics for float32 and bfloat16 models, float64 for float64 ones.
      xs = x.astype(jnp.promote_types(self.dtype, jnp.float32))
      mean = jnp.mean(xs, axes)
      # One pass over the data for both moments (Flax's default); clipped because rounding can make it negative.
      var = jnp.maximum(jnp.mean(jnp.square(xs), axes) - jnp.square(mean), 0.0)
      if not self.is_initializing():
        count = x.size // channels
        unbiased_var = var * (count / max(count - 1, 1))
        # Stored in the variables' dtype (float32), whatever the statistics were computed in.
        running_mean.value = ((1 - self.momentum) * running_mean.value + self.momentum * mean).astype(
            running_mean.value.dtype)
        running_var.value = ((1 - self.momentum) * running_var.value + self.momentum * unbiased_var).astype(
            running_var.value.dtype)
    else:
      mean, var = running_mean.value, running_var.value
    # Fold into one multiply-add per element: y = x * a + b with a, b computed once per channel in float32 (float64
    # for float64 models).
    multiplier = scale * jax.lax.rsqrt(var + self.epsilon)
    offset = bias - mean * multiplier
    if train:
      # In the statistics' precision, rounded once to `dtype`: the gradient through batch statistics is a difference
      # of nearly equal terms (dy - mean(dy) - x_hat * mean(dy * x_hat)), and summed in bfloat16 those terms lost
      # much of it (a random-weight U-Net-ResNet18's bfloat16 gradient at cosine 0.79 to float32's, 0.89 with this;
      # what remains is bfloat16's rounding amplified through the layers, tests/mixed_precision_test.py).
      return (xs * multiplier + offset).astype(self.dtype)
    return x * multiplier.astype(self.dtype) + offset.astype(self.dtype)


class ConvBNReLU(nn.Module):
  """Conv (no bias) -> BatchNorm -> optional ReLU, the unit every ResNet and decoder block is built from."""
  features: int
  kernel_size: int = 3
  stride: int = 1
  dilation: int = 1
  relu: bool = True
  dtype: Dtype = jnp.float32
  kernel_init: Any = resnet_conv_init

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = conv(self.features, self.kernel_size, self.stride, self.dilation, dtype=self.dtype,
             kernel_init=self.kernel_init, name="conv")(x)
    x = BatchNorm(dtype=self.dtype, name="bn")(x, train)
    return nn.relu(x) if self.relu else x


def _phase_taps(kernel_size: int, stride: int, padding: int) -> tuple[np.ndarray, int]:
  """Which kernel tap each output phase reads at each input offset, for a transposed conv with k - 2p = stride.

  Output row o = stride * a + r reads input rows a + d: tap kk = stride * (a - i) + r + p of input row i = a + d.
  Returns taps [D, stride] (kernel index, or kernel_size for "no tap": a zero row) and the smallest offset d_min,
  where D = d_max - d_min + 1 offsets cover every phase.
  """
  by_phase = [{(r + padding - kk) // stride: kk for kk in range(kernel_size) if (kk - r - padding) % stride == 0}
              for r in range(stride)]
  offsets = [d for taps in by_phase for d in taps]
  d_min, d_max = min(offsets), max(offsets)
  table = np.full((d_max - d_min + 1, stride), kernel_size)
  for r, taps in enumerate(by_phase):
    for d, kk in taps.items():
      table[d - d_min, r] = kk
  return table, d_min


def dilated_conv_transpose2d(x: jax.Array, kernel: jax.Array, stride: int, padding: int,
                             groups: int = 1) -> jax.Array:
  """torch's ConvTranspose2d in its textbook form, for any shape: the stride-dilated input correlated with the
  spatially flipped kernel. Same arguments and result as `conv_transpose2d`."""
  edge = kernel.shape[0] - 1 - padding
  return jax.lax.conv_general_dilated(
      x, kernel[::-1, ::-1], window_strides=(1, 1), padding=((edge, edge), (edge, edge)),
      lhs_dilation=(stride, stride), dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)


def zero_inserted_conv_transpose2d(x: jax.Array, kernel: jax.Array, stride: int, padding: int,
                                   groups: int = 1) -> jax.Array:
  """`dilated_conv_transpose2d` with the stride's zeros inserted explicitly (pad a unit axis, reshape) and an
  ordinary stride-1 convolution, for exporters: ONNX converters map an lhs-dilated convolution to ConvTranspose
  with the wrong strides (jax2onnx 0.12.5), while Pad, Reshape and Conv map one to one. Same arguments and result.

  Each input pixel is followed by stride - 1 zeros along H and W, [N, H, W, C] -> [N, sH, sW, C]: the dilated input
  plus stride - 1 trailing zeros, which the end padding discounts.
  """
  n, h, w, c = x.shape
  k = kernel.shape[0]
  edge = k - 1 - padding
  end = edge - (stride - 1)
  if end < 0:
    return dilated_conv_transpose2d(x, kernel, stride, padding, groups)
  spread = jnp.pad(x[:, :, None, :, None, :], ((0, 0), (0, 0), (0, stride - 1), (0, 0), (0, stride - 1), (0, 0)))
  spread = spread.reshape(n, h * stride, w * stride, c)
  return jax.lax.conv_general_dilated(
      spread, kernel[::-1, ::-1], window_strides=(1, 1), padding=((edge, end), (edge, end)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)


def conv_transpose2d(x: jax.Array, kernel: jax.Array, stride: int, padding: int, groups: int = 1) -> jax.Array:
  """torch's ConvTranspose2d on NHWC: x [N, H, W, Cin], kernel [k, k, Cin/groups, Cout] -> [N, H', W', Cout].

  H' = (H - 1) * stride - 2 * padding + k. `dilated_conv_transpose2d` on GPUs and TPUs (cuDNN and the TPU run the
  lhs-dilated convolution as a convolution's data gradient); on the CPU `conv_transpose2d_cpu` where k - 2 * padding
  = stride.
  """
  if platforms.export_forms() == "portable":
    return zero_inserted_conv_transpose2d(x, kernel, stride, padding, groups)
  dilated = functools.partial(dilated_conv_transpose2d, stride=stride, padding=padding, groups=groups)
  if kernel.shape[0] - 2 * padding != stride:
    return dilated(x, kernel)
  phases = functools.partial(conv_transpose2d_cpu, stride=stride, padding=padding, groups=groups)
  return platforms.per_backend(cpu=phases, accelerator=dilated)(x, kernel)


def conv_transpose2d_cpu(x: jax.Array, kernel: jax.Array, stride: int, padding: int, groups: int = 1) -> jax.Array:
  """`conv_transpose2d` as XLA:CPU runs it fastest: where k - 2 * padding = stride (every upsampling layer here:
  kernel 4 / stride 2 / padding 1, kernel 2 / stride 2 / padding 0, CASENet's 2f / f / f/2), H' = stride * H and the
  layer is computed as its stride^2 output phases: one ordinary convolution over the input (a (D x D) kernel with
  D = 3 for kernel 4 / stride 2, D = 1 for kernel 2 / stride 2) that gives Cout * stride^2 channels, then a
  depth-to-space. That does the same arithmetic as the definition without multiplying the zeros of a dilated input,
  and its gradient is an ordinary convolution's: 6-45x faster forward + backward than the dilated convolution on
  XLA:CPU (`python -m benchmarks.layers`). Other shapes fall back to `dilated_conv_transpose2d`.
  """
  k = kernel.shape[0]
  n, h, w, _ = x.shape
  cout = kernel.shape[-1]
  if k - 2 * padding != stride:
    return dilated_conv_transpose2d(x, kernel, stride, padding, groups)
  table, d_min = _phase_taps(k, stride, padding)
  size = table.shape[0]
  zero_padded = jnp.pad(kernel, ((0, 1), (0, 1), (0, 0), (0, 0)))
  # [D, D, s, s, Cin/g, Cout] -> [D, D, Cin/g, Cout, s, s]: phases innermost, so output channels stay grouped.
  phases = zero_padded[table[:, None, :, None], table[None, :, None, :]]
  phases = phases.transpose(0, 1, 4, 5, 2, 3).reshape(size, size, kernel.shape[2], cout * stride * stride)
  y = conv2d_cpu(jnp.pad(x, ((0, 0), (-d_min, size - 1 + d_min), (-d_min, size - 1 + d_min), (0, 0))), phases,
                 groups=groups)
  y = y.reshape(n, h, w, cout, stride, stride).transpose(0, 1, 4, 2, 5, 3)
  return y.reshape(n, h * stride, w * stride, cout)


class ConvTranspose2d(nn.Module):
  """torch.nn.ConvTranspose2d(in, features, kernel_size, stride, padding): [N, H, W, Cin] -> [N, H', W', features].

  H' = (H - 1) * stride - 2 * padding + kernel_size, e.g. 2H for kernel 4, stride 2, padding 1. The kernel is stored
  as [k, k, Cin / groups, features], i.e. torch's [Cin, features / groups, k, k] moved to the back without flipping
  (see `conv_transpose2d`). `groups` splits the channels like torch's `groups`.
  """
  features: int
  kernel_size: int = 4
  stride: int = 2
  padding: int = 1
  groups: int = 1
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  kernel_init: Any = decoder_conv_init
  bias_init: Any = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.padding > self.kernel_size - 1:
      raise ValueError(f"ConvTranspose2d: padding {self.padding} larger than kernel_size - 1 = {self.kernel_size - 1}")
    kernel = _grouped_kernel(self, x.shape[-1])
    y = conv_transpose2d(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, self.padding, self.groups)
    return _add_bias(self, y)


def max_pool2d(x: jax.Array, window: int, stride: int, padding: int = 0) -> jax.Array:
  """torch's MaxPool2d(window, stride, padding) on NHWC: padding counts as -inf, [N, H, W, C] -> [N, H', W', C].

  The same `lax.reduce_window` max that `flax.linen.max_pool` builds, called directly: exporters that patch Flax's
  pooling function (jax2onnx) then see the primitive itself, with its explicit padding.
  """
  if platforms.export_forms() == "portable" and (window, stride, padding) in ((2, 2, 0), (3, 2, 1)):
    return reshaped_max_pool2d(x, window, padding)
  # A concrete numpy scalar, so that reduce_window recognizes the max monoid (and has its gradient).
  init = np.array(-np.inf, x.dtype)
  return jax.lax.reduce_window(x, init, jax.lax.max, (1, window, window, 1), (1, stride, stride, 1),
                               ((0, 0), (padding, padding), (padding, padding), (0, 0)))


def reshaped_max_pool2d(x: jax.Array, window: int, padding: int) -> jax.Array:
  """`max_pool2d` at stride 2 for (window 2, padding 0) and (window 3, padding 1), the model's two pools, as maxima
  over reshaped pairs (Reshape, Pad, Slice, Max in ONNX), one axis after the other (a max over a square window
  is separable). For exporters: jax2onnx 0.12.5 emits MaxPool over all four NHWC axes, which onnxruntime refuses.
  H and W must be even (every model's input multiple makes them so).
  """
  for axis in (1, 2):
    size = x.shape[axis]
    shape = x.shape[:axis] + (size // 2, 2) + x.shape[axis + 1:]
    pairs = x.reshape(shape)  # (x[2i], x[2i + 1])
    y = jnp.maximum(*(jax.lax.index_in_dim(pairs, i, axis + 1, keepdims=False) for i in (0, 1)))
    if window == 3:  # and x[2i - 1], with -inf above the first row (torch's padding 1)
      widths = [(0, 0)] * x.ndim
      widths[axis] = (padding, 0)
      previous = jax.lax.slice_in_dim(jnp.pad(x, widths, constant_values=-jnp.inf), 0, size, axis=axis)
      y = jnp.maximum(y, jax.lax.index_in_dim(previous.reshape(shape), 0, axis + 1, keepdims=False))
    x = y
  return x


def upsample_nearest(x: jax.Array, factor: int = 2) -> jax.Array:
  """Nearest-neighbour upsampling by an integer factor: [N, H, W, C] -> [N, factor*H, factor*W, C]."""
  n, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (n, h, factor, w, factor, c))
  return x.reshape(n, h * factor, w * factor, c)


def _fold_upsampled_taps(kernel: jax.Array, axis: int) -> list[jax.Array]:
  """The 3 taps of `kernel` along `axis` (0: rows, 1: columns) as each output phase of a x2 nearest upsampling sees
  them through a 2-tap low-resolution window: phase 0 reads rows (2i - 1, 2i, 2i + 1) = low rows (i - 1, i, i),
  phase 1 reads (2i, 2i + 1, 2i + 2) = (i, i, i + 1). Returns [phase 0, phase 1], each with 2 taps along `axis`."""
  first, middle, last = (jax.lax.index_in_dim(kernel, i, axis) for i in range(3))
  return [jnp.concatenate([first, middle + last], axis), jnp.concatenate([first + middle, last], axis)]


def upsample2_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """conv2d(upsample_nearest(x, 2), kernel, padding=1): [N, H, W, C], kernel [3, 3, C, F] -> [N, 2H, 2W, F].

  Computed so on GPUs and TPUs; on the CPU at the low resolution (`upsample2_conv3x3_cpu`).
  """
  return platforms.per_backend(cpu=upsample2_conv3x3_cpu, accelerator=_upsample2_then_conv3x3)(x, kernel)


def _upsample2_then_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return plain_conv2d(upsample_nearest(x, 2), kernel, padding=1)


def upsample2_conv3x3_cpu(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`upsample2_conv3x3` computed at the low resolution, the form XLA:CPU runs fastest.

  Each of the 4 output phases of the upsampled image sees a 2x2 low-resolution window through a
  folded kernel (sums of the 3x3 taps), so one 2x2 convolution with 4F outputs over the input padded by 1 gives all
  phases at once; phase (r, c) is its window starting at (r, c). Same function, 16/36 of the multiply-adds and no
  upsampled copy: the U-Net decoder's "upsample, concatenate, conv" spends most of its time here.
  """
  n, h, w, channels = x.shape
  features = kernel.shape[-1]
  # [2, 2, C, F] per phase (r, c) -> [2, 2, C, (r, c, F)]: sums over the leading axes and F-sized blocks, no
  # transposes of the minor dimensions.
  by_row = [_fold_upsampled_taps(rows, 1) for rows in _fold_upsampled_taps(kernel, 0)]
  phases = jnp.stack([jnp.stack(by_col, axis=3) for by_col in by_row], axis=3).reshape(2, 2, channels, 4 * features)
  # Padded outside the convolution: with the padding inside, XLA turns this even-sized kernel's weight gradient into a
  # reversed convolution that runs ~45x slower on CPU.
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  y = conv2d_cpu(padded, phases).reshape(n, h + 1, w + 1, 2, 2, features)
  rows = [jnp.stack([y[:, r:r + h, c:c + w, r, c] for c in (0, 1)], axis=3) for r in (0, 1)]  # [N, H, W, 2, F]
  return jnp.stack(rows, axis=2).reshape(n, 2 * h, 2 * w, features)


class UpsampleConcatConv(nn.Module):
  """3x3 conv (padding 1, no bias) of concat([upsample_nearest(x, 2), skip]): [N, H, W, C] (+ [N, 2H, 2W, S]) ->
  [N, 2H, 2W, features], without building the upsampled or concatenated tensors.

  One 'kernel' [3, 3, C + S, features] (as the conv of the concatenation would have, so torch weights map one to
  one); its first C input channels act on x through `upsample2_conv3x3`, the rest on the skip.
  """
  features: int
  dtype: Dtype = jnp.float32
  kernel_init: Any = decoder_conv_init

  @nn.compact
  def __call__(self, x: jax.Array, skip: jax.Array | None = None) -> jax.Array:
    channels = x.shape[-1]
    in_channels = channels + (0 if skip is None else skip.shape[-1])
    kernel = self.param("kernel", self.kernel_init, (3, 3, in_channels, self.features), jnp.float32)
    kernel = kernel.astype(self.dtype)
    y = upsample2_conv3x3(x.astype(self.dtype), kernel[:, :, :channels])
    if skip is not None:
      y = y + conv2d(skip.astype(self.dtype), kernel[:, :, channels:], padding=1)
    return y


def resize_bilinear(x: jax.Array, height: int, width: int) -> jax.Array:
  """Bilinear resize with half-pixel centres (torch's align_corners=False): [N, H, W, C] -> [N, height, width, C]."""
  n, _, _, c = x.shape
  return jax.image.resize(x, (n, height, width, c), method="bilinear", antialias=False)


def upsample_bilinear(x: jax.Array, factor: int) -> jax.Array:
  """`resize_bilinear` to factor x the size, [N, H, W, C] -> [N, fH, fW, C], for an integer factor, written as
  convolutions and reshapes: what exporters map exactly and with symbolic H and W (jax2onnx 0.12.5 turns
  `jax.image.resize` into a Resize of other coordinates and needs every dimension fixed).

  Output row f * i + r sits at input coordinate i + t_r, t_r = (r + 0.5) / f - 0.5 (half-pixel centres), between
  rows i and i + 1 (t_r >= 0) or i - 1 and i (t_r < 0). One depthwise 3-tap convolution per axis gives the f phases
  as channels, a reshape interleaves them. Taps outside the image are dropped and the rest renormalized (divided by
  the same convolution of ones), as `jax.image.resize` does: at the border an upsampling repeats the edge value.
  """
  if factor == 1:
    return x
  channels = x.shape[-1]
  taps = np.zeros((3, factor), np.float32)
  for r in range(factor):
    t = (r + 0.5) / factor - 0.5
    taps[:, r] = (0.0, 1 - t, t) if t >= 0 else (-t, 1 + t, 0.0)
  # [3, f] -> depthwise kernel [3, 1, 1, C * f], output channel c * f + r.
  kernel = jnp.asarray(np.tile(taps, (1, channels)).reshape(3, 1, 1, channels * factor), x.dtype)
  ones = jnp.ones_like(x[..., :1])
  for axis in (1, 2):
    k = kernel if axis == 1 else kernel.transpose(1, 0, 2, 3)
    pad = ((1, 1), (0, 0)) if axis == 1 else ((0, 0), (1, 1))

    def spread(z, k=k, pad=pad):
      return jax.lax.conv_general_dilated(z, k, (1, 1), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                          feature_group_count=z.shape[-1])

    n, h, w = x.shape[:3]
    weight = spread(ones, k[..., :factor])  # [N, H, W, f]: 1 inside, the kept taps' sum at the border
    y = spread(x).reshape(n, h, w, channels, factor) / weight[..., None, :]
    if axis == 1:
      x = y.transpose(0, 1, 4, 2, 3).reshape(n, h * factor, w, channels)
    else:
      x = y.transpose(0, 1, 2, 4, 3).reshape(n, h, w * factor, channels)
    ones = jnp.ones_like(x[..., :1])
  return x


def check_spatial_size(x: jax.Array, multiple: int, model: str) -> None:
  """Raises a ValueError unless x is [N, H, W, C] with H and W multiples of `multiple`."""
  if x.ndim != 4:
    raise ValueError(f"{model} expects an NHWC batch [N, H, W, C], got an array of shape {x.shape}; add the batch "
                     "axis with x[None] or the channel axis with x[..., None]")
  h, w = x.shape[1], x.shape[2]
  if h % multiple or w % multiple:
    raise ValueError(f"{model} needs H and W divisible by {multiple}, got {h} x {w}; pad or crop the input to "
                     f"{-(-h // multiple) * multiple} x {-(-w // multiple) * multiple} (e.g. jnp.pad with mode "
                     "'reflect') and crop the logits back")
