"""Segmentation losses as pure functions, in the optax style.

Every loss takes `logits` and `labels` of the same shape, e.g. [N, H, W, 1], where `labels` is 1 on membrane and 0
on background (float or bool), and returns a scalar averaged over the batch. Options are keyword-only.

The paper trains with L = L_focal + lambda * L_dice, gamma = 2, lambda = 1.
"""

import jax
import jax.numpy as jnp
import optax


def sigmoid_focal(logits: jax.Array, labels: jax.Array, *, gamma: float = 2.0, alpha: float | None = None) -> jax.Array:
  """Mean sigmoid focal loss (Lin et al. 2017); with gamma = 0 and alpha = None it is plain BCE.

  Args:
    logits: [...] pre-sigmoid scores.
    labels: [...] targets in {0, 1}.
    gamma: focusing exponent: (1 - p_t)^gamma down-weights easy pixels.
    alpha: optional weight of the positive (membrane) class, 1 - alpha on background.

  Returns:
    Scalar mean over all elements.
  """
  labels = labels.astype(logits.dtype)
  return jnp.mean(optax.sigmoid_focal_loss(logits, labels, alpha=alpha, gamma=gamma))


def soft_dice(logits: jax.Array, labels: jax.Array, *, smooth: float = 1.0) -> jax.Array:
  """Soft dice loss 1 - (2 sum(p y) + s) / (sum p + sum y + s), per image, averaged over the batch.

  The smoothing term `s` makes an all-background crop predicted as background cost ~0 instead of 0/0.

  Args:
    logits: [N, ...] pre-sigmoid scores; the first axis is the batch.
    labels: [N, ...] targets in {0, 1}.
    smooth: additive smoothing in numerator and denominator.

  Returns:
    Scalar mean over the batch.
  """
  labels = labels.astype(jnp.float32)
  probs = jax.nn.sigmoid(logits.astype(jnp.float32))
  axes = tuple(range(1, logits.ndim))
  intersection = jnp.sum(probs * labels, axis=axes)
  total = jnp.sum(probs, axis=axes) + jnp.sum(labels, axis=axes)
  return jnp.mean(1.0 - (2.0 * intersection + smooth) / (total + smooth))


def focal_dice(
    logits: jax.Array,
    labels: jax.Array,
    *,
    gamma: float = 2.0,
    alpha: float | None = None,
    dice_weight: float = 1.0,
    smooth: float = 1.0,
) -> jax.Array:
  """The paper's loss: sigmoid_focal(gamma, alpha) + dice_weight * soft_dice. Shapes as `soft_dice`."""
  return sigmoid_focal(logits, labels, gamma=gamma, alpha=alpha) + dice_weight * soft_dice(
      logits, labels, smooth=smooth)


def binary_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean sigmoid binary cross-entropy, computed stably from logits."""
  return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels.astype(logits.dtype)))


LOSSES = {
    "focal_dice": focal_dice,
    "focal": sigmoid_focal,
    "dice": soft_dice,
    "bce": binary_cross_entropy,
}


def from_config(loss_config):
  """Returns loss(logits, labels) -> scalar from a config with `name` and the loss's keyword options."""
  options = dict(loss_config)
  name = options.pop("name")
  if name not in LOSSES:
    raise ValueError(f"Unknown loss {name!r}: set config.loss.name to one of {sorted(LOSSES)}.")
  loss_fn = LOSSES[name]
  return lambda logits, labels: loss_fn(logits, labels, **options)
