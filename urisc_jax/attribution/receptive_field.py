"""The receptive field of a segmentation model, measured: how far from a target pixel its logit can look.

Integrated gradients over a window around each target (`integrated_gradients.receptive_field_crop`) equal the
whole-image ones when the window holds the target's whole receptive field. The field is measured rather than
derived layer by layer, so it holds for any model the registry builds: the support of an input gradient, on a narrow
copy of the model whose ReLUs are all kept active so that no path is cut.
"""

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from urisc_jax import models
from urisc_jax.attribution.integrated_gradients import MODEL_STRIDE, LogitFn, ModelLogits


@functools.partial(jax.jit, static_argnames=("logit_fn", "block"))
def _block_gradient_support(logit_fn: LogitFn, variables, x, corner, block):
  """bool [S, S]: input pixels on which the summed logits of a block x block square at (corner, corner) depend."""
  def block_sum(x):
    logits = logit_fn(variables, x)[0]
    return jnp.sum(jax.lax.dynamic_slice(logits, (corner, corner), (block, block)))
  return jnp.any(jax.grad(block_sum)(x)[0] != 0, axis=-1)


def receptive_field_radius(logit_fn: LogitFn, variables: Any, *, in_channels: int = 1, multiple: int = MODEL_STRIDE,
                           size: int = 512, max_size: int = 4096, seed: int = 0,
                           calibrate: Callable[[Any, jax.Array], Any] | None = None) -> int:
  """The radius r such that a target's logit depends only on input pixels within r of it (rows and columns).

  Measured: the support of the input gradient of the summed logits of a `multiple` x `multiple` block of output
  pixels (every phase of the model's downsampling grid) on a random input, as far as it reaches from the block. The
  input grows (doubling from `size`) until the support stays clear of its border. The support is the theoretical
  receptive field when no ReLU is dead on the way (see `model_receptive_field_radius`, which ensures that).

  Args:
    logit_fn, variables: the model, as for `integrated_gradients`.
    in_channels: input channels.
    multiple: the model's downsampling grid (32 for every registry model).
    size, max_size: first and largest input side tried.
    seed: seed of the random input.
    calibrate: optional (variables, x) -> variables, called on each input before measuring.

  Returns:
    r in px.

  Raises:
    ValueError: the receptive field is wider than `max_size` / 2, or the logits do not depend on the input.
  """
  rng = np.random.default_rng(seed)
  while size <= max_size:
    corner = size // 2 // multiple * multiple
    x = jnp.asarray(rng.standard_normal((1, size, size, in_channels), np.float32))
    measured = calibrate(variables, x) if calibrate is not None else variables
    support = np.asarray(_block_gradient_support(logit_fn, measured, x, corner, multiple))
    rows, cols = np.flatnonzero(support.any(axis=1)), np.flatnonzero(support.any(axis=0))
    if rows.size == 0:
      raise ValueError("The logits do not depend on the input (every gradient is zero): dead ReLUs everywhere?")
    if rows[0] > 0 and cols[0] > 0 and rows[-1] < size - 1 and cols[-1] < size - 1:
      last = corner + multiple - 1
      return int(max(last - rows[0], last - cols[0], rows[-1] - corner, cols[-1] - corner))
    size *= 2
  raise ValueError(f"The receptive field reaches beyond a {max_size} px input: pass a larger max_size.")


def _batch_norm_paths(batch_stats: Any) -> set[tuple[str, ...]]:
  """Module paths of the BatchNorms: the parents of the 'mean' / 'var' leaves of batch_stats."""
  paths = set()
  for path, _ in jax.tree_util.tree_leaves_with_path(batch_stats):
    paths.add(tuple(p.key for p in path[:-1]))
  return paths


def _active_relu_variables(model: nn.Module, variables: Any, x: jax.Array) -> Any:
  """`variables` with every BatchNorm's running statistics set to x's batch statistics, scale 1/4 and bias 1.

  Eval-mode BatchNorm then maps each channel to about 1 + z / 4 with z standardized over the image, which is
  positive (z > -4) at almost every pixel: every ReLU after it is active, the network is linear in its input almost
  everywhere, and no gradient path is cut. A narrow network with random weights would otherwise lose whole regions
  of its receptive field to dead ReLUs.
  """
  norms = _batch_norm_paths(variables.get("batch_stats", {}))
  if not norms:
    return variables

  def set_affine(path, leaf):
    keys = tuple(p.key for p in path)
    if keys[:-1] in norms:
      return jnp.full_like(leaf, 0.25 if keys[-1] == "scale" else 1.0)
    return leaf

  params = jax.tree_util.tree_map_with_path(set_affine, variables["params"])

  def running_stats(fill):
    start = jax.tree.map(lambda leaf: jnp.full_like(leaf, fill), variables["batch_stats"])
    _, updates = model.apply({"params": params, "batch_stats": start}, x, train=True, mutable=["batch_stats"])
    return updates["batch_stats"]

  # Train mode normalizes with the batch's statistics b whatever the running ones, and moves those to
  # (1 - momentum) * start + momentum * b: two starts give momentum and b for every layer.
  from_zeros, from_ones = running_stats(0.0), running_stats(1.0)
  batch = jax.tree.map(lambda r0, r1: r0 / (1.0 - (r1 - r0)), from_zeros, from_ones)
  return {**variables, "params": params, "batch_stats": batch}


@functools.lru_cache(maxsize=16)
def model_receptive_field_radius(model: nn.Module, *, in_channels: int = 1, multiple: int = MODEL_STRIDE,
                                 max_size: int = 4096) -> int:
  """`receptive_field_radius` of a registry model, measured on a narrow copy with random weights.

  The receptive field depends on the layers' kernels, strides and dilations, not on their widths or weights, so a
  copy at width 1/16 with random weights gives the same radius at a fraction of the cost. Its BatchNorms are set so
  that every ReLU is active (`_active_relu_variables`) and no part of the field is lost to dead units. Costs a
  compilation and one gradient at 512 - 1024 px (seconds to a minute on a CPU); cached per model.
  """
  narrow = model.clone(width=min(float(model.width), 1 / 16)) if hasattr(model, "width") else model
  variables = models.random_variables(models.abstract_variables(narrow, (1, multiple, multiple, in_channels)))
  calibrate = jax.jit(functools.partial(_active_relu_variables, narrow))
  return receptive_field_radius(ModelLogits(narrow), variables, in_channels=in_channels, multiple=multiple,
                                max_size=max_size, calibrate=calibrate)
