"""A stride-1 convolution whose weight gradient is computed in the form XLA:CPU's Eigen convolutions run fastest.

The weight gradient of y = conv(x, W) (stride 1) is dW[i, j, c, f] = sum_{n, h, w} x[n, h + i, w + j, c] dy[n, h, w, f].
XLA writes it as a convolution of x (batch: c, feature: n) with dy (window: the whole map) and so first transposes x
to [C, H, W, N]: a copy whose minor dimension is the batch (2 elements per run), into which XLA also fuses (and
recomputes) the elementwise producers of x: BatchNorm, ReLU and the ResNet's residual sums for a U-Net's skips.
Here the roles are swapped: dy, padded, is the convolved image (batch: f, feature: n) and x the window
([H, W, N, C], a copy that keeps C minor). Same sum, same float32 arithmetic. On 2 CPU cores with Eigen
convolutions, batch 2: 1.0-2.5x faster for each 3x3 layer of a U-Net-ResNet50 at 512^2, 1.6x in total
(`python -m benchmarks.layers --parts=weight_gradients --size=512`); at 1024^2 the 16-channel full-resolution layer
measured 5 % slower, the whole U-Net-ResNet50 train step 19.7 -> 16.8 s. A 64 x 64 x 256 layer at batch 4: 10 %
faster; a 256 x 256 x 64 one at batch 8: 25 % slower. So larger batches and other backends (GPU, TPU, or YNNPACK
convolutions on the CPU, where it is slower) keep XLA's own gradient.

Being a custom VJP, this path supports reverse mode (grad, vjp, also nested) but not forward mode: jax.jvp or
jax.jacfwd through a model on the CPU needs `cpu_convolution.MAX_SWAPPED_BATCH = 0` first (XLA's gradient then).
"""

import functools

import jax

from urisc_jax import xla_flags

# Largest batch (as traced: the global batch under jit) for which the swapped weight gradient is used.
MAX_SWAPPED_BATCH = 4
_NHWC = ("NHWC", "HWIO", "NHWC")


def _conv(x: jax.Array, kernel: jax.Array, padding: int) -> jax.Array:
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((padding, padding), (padding, padding)),
                                      dimension_numbers=_NHWC)


def swapped_weight_gradient(x: jax.Array, dy: jax.Array, kernel_size: int, padding: int) -> jax.Array:
  """dW of `_conv(x, W, padding)` for x [N, H, W, C] and dy [N, H', W', F] as a convolution of dy by x: [k, k, C, F].

  With s = k - 1 - i: dW[i] = sum_h x[h] dy[h + padding - i] = sum_h dy_padded[h + s] x[h], dy padded by
  k - 1 - padding on each side, so the result comes out spatially reversed.
  """
  edge = kernel_size - 1 - padding
  image = jax.numpy.pad(dy, ((0, 0), (edge, edge), (edge, edge), (0, 0))).transpose(3, 1, 2, 0)  # [F, ., ., N]
  window = x.transpose(1, 2, 0, 3)  # [H, W, N, C]
  reversed_gradient = jax.lax.conv_general_dilated(image, window, (1, 1), "VALID", dimension_numbers=_NHWC)
  return reversed_gradient[:, ::-1, ::-1].transpose(1, 2, 3, 0)  # [F, k, k, C] -> [k, k, C, F]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_with_swapped_weight_gradient(x: jax.Array, kernel: jax.Array, padding: int) -> jax.Array:
  return _conv(x, kernel, padding)


def _forward(x, kernel, padding):
  return _conv(x, kernel, padding), (x, kernel)


def _backward(padding, residuals, dy):
  x, kernel = residuals
  _, input_pullback = jax.vjp(lambda x: _conv(x, kernel, padding), x)
  return input_pullback(dy)[0], swapped_weight_gradient(x, dy, kernel.shape[0], padding).astype(kernel.dtype)


_conv_with_swapped_weight_gradient.defvjp(_forward, _backward)


def conv2d_stride1_cpu(x: jax.Array, kernel: jax.Array, padding: int) -> jax.Array:
  """conv(x [N, H, W, C], kernel [k, k, C, F]) at stride 1 with symmetric `padding`: [N, H', W', F], for XLA:CPU.

  With Eigen convolutions (`xla_flags`) and a batch of at most MAX_SWAPPED_BATCH, its weight gradient is
  `swapped_weight_gradient`; otherwise XLA's own. Values and gradients are the same either way. Only the CPU form of
  `layers.conv2d` calls this (`platforms.per_backend`): GPUs and TPUs keep XLA's gradient.
  """
  if x.shape[0] > MAX_SWAPPED_BATCH or not xla_flags.eigen_convolutions():
    return _conv(x, kernel, padding)
  return _conv_with_swapped_weight_gradient(x, kernel, padding)
