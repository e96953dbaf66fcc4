"""Segmentation losses as pure functions, in the optax style.

Every loss takes `logits` and `labels` of the same shape, e.g. [N, H, W, 1], where `labels` is 1 on membrane and 0
on background (float or bool), and returns a scalar averaged over the batch. Options are keyword-only. Logits are
read in float32 whatever the model's compute dtype, so bfloat16 models get float32 losses and gradients.

The paper trains with L = L_focal + lambda * L_dice, gamma = 2, lambda = 1. CASENet (Yu et al. 2017) trains with a
class-balanced BCE on its fused output and its side outputs (deep supervision, see `deeply_supervised`). U-RISC
competitors also used focal with alpha 0.25 or 0.7 on membrane and a soft-F1 loss.
"""

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

LossFn = Callable[[jax.Array, jax.Array], jax.Array]


def _as_float32(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  return jnp.asarray(logits, jnp.float32), jnp.asarray(labels).astype(jnp.float32)


def sigmoid_focal(logits: jax.Array, labels: jax.Array, *, gamma: float = 2.0, alpha: float | None = None) -> jax.Array:
  """Mean sigmoid focal loss (Lin et al. 2017); with gamma = 0 and alpha = None it is plain BCE.

  Per pixel: -w_t (1 - p_t)^gamma log(p_t), with p_t = p on membrane and 1 - p on background, p = sigmoid(logit),
  w_t = alpha on membrane and 1 - alpha on background (1 when alpha is None).

  Args:
    logits: [...] pre-sigmoid scores.
    labels: [...] targets in {0, 1}.
    gamma: focusing exponent: (1 - p_t)^gamma down-weights easy pixels.
    alpha: optional weight of the positive (membrane) class, 1 - alpha on background.

  Returns:
    Scalar mean over all elements.
  """
  logits, labels = _as_float32(logits, labels)
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
  logits, labels = _as_float32(logits, labels)
  probs = jax.nn.sigmoid(logits)
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
  """Mean sigmoid binary cross-entropy, computed stably from logits. Shapes as `sigmoid_focal`."""
  logits, labels = _as_float32(logits, labels)
  return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels))


def class_balanced_bce(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Class-balanced sigmoid BCE of HED (Xie & Tu 2015) and CASENet (Yu et al. 2017).

  Each class is weighted by the other class's fraction of the batch, so that thin membranes (a few % of the pixels)
  weigh as much in total as the background:

      beta = |background| / |all|   (pixels of the whole batch, all channels)
      L = mean over pixels of  -beta y log p - (1 - beta) (1 - y) log(1 - p)

  HED and CASENet sum over pixels; the mean keeps the loss's scale independent of the crop size (a constant factor
  that only moves the learning rate). A batch without membrane (beta = 1) gives background no weight at all.

  Args:
    logits: [N, H, W, K] pre-sigmoid scores.
    labels: [N, H, W, K] targets in {0, 1}.

  Returns:
    Scalar.
  """
  logits, labels = _as_float32(logits, labels)
  beta = 1.0 - jnp.mean(labels)  # labels are data: no gradient flows through the weights anyway
  weights = beta * labels + (1.0 - beta) * (1.0 - labels)
  return jnp.mean(weights * optax.sigmoid_binary_cross_entropy(logits, labels))


def soft_f1(logits: jax.Array, labels: jax.Array, *, smooth: float = 1.0) -> jax.Array:
  """1 - soft F1 of the membrane class, pooled over the whole batch.

  With p = sigmoid(logits), soft counts TP = sum p y, FP = sum p (1 - y), FN = sum (1 - p) y over every pixel of the
  batch, and F1 = (2 TP + s) / (2 TP + FP + FN + s). Unlike `soft_dice`, which averages one score per image, the
  counts are pooled, so a crop without membrane does not produce its own near-0/0 score (the official U-RISC F1 is
  per image, but a pooled batch score is the common differentiable stand-in). `s` keeps an empty batch finite.

  Args:
    logits: [N, ...] pre-sigmoid scores.
    labels: [N, ...] targets in {0, 1}.
    smooth: additive smoothing in numerator and denominator.

  Returns:
    Scalar in [0, 1].
  """
  logits, labels = _as_float32(logits, labels)
  probs = jax.nn.sigmoid(logits)
  true_positive = jnp.sum(probs * labels)
  false_positive = jnp.sum(probs * (1.0 - labels))
  false_negative = jnp.sum((1.0 - probs) * labels)
  return 1.0 - (2.0 * true_positive + smooth) / (2.0 * true_positive + false_positive + false_negative + smooth)


LOSSES: dict[str, LossFn] = {
    "focal_dice": focal_dice,
    "focal": sigmoid_focal,
    "dice": soft_dice,
    "bce": binary_cross_entropy,
    "balanced_bce": class_balanced_bce,
    "soft_f1": soft_f1,
}



def register(name: str):
  """Function decorator: adds a loss to LOSSES, so `from_config` (config.loss.name) finds it; for outside code.

      @losses.register("weighted_bce")
      def weighted_bce(logits, labels, *, membrane_weight: float = 1.0):  # [N, H, W, 1] each -> scalar
        ...

  The loss takes `logits` and `labels` of the same shape and returns a scalar; its keyword-only arguments are its
  options, read from config.loss. Registering the same function again (re-running its module) is allowed.

  Args:
    name: the loss's name in config.loss.name; must not be taken by another function.

  Returns:
    The decorator, which returns the function unchanged.

  Raises:
    ValueError: the name is taken by another loss.
  """

  def add(loss_fn: LossFn) -> LossFn:
    previous = LOSSES.get(name)
    if previous is not None and (getattr(previous, "__module__", None), getattr(previous, "__qualname__", None)) != (
        getattr(loss_fn, "__module__", None), getattr(loss_fn, "__qualname__", None)):
      raise ValueError(f"loss name {name!r} is already registered by {previous.__module__}.{previous.__qualname__}")
    LOSSES[name] = loss_fn
    return loss_fn

  return add


# config.loss keys that are not options of a loss function.
_NON_LOSS_KEYS = ("name", "deep_supervision")


def side_logits(mutable_state: dict[str, Any]) -> tuple[jax.Array, ...]:
  """The side logits a model sowed, from `model.apply(..., mutable=["batch_stats", "intermediates"])`'s state.

  Args:
    mutable_state: the second output of `model.apply` with "intermediates" mutable.

  Returns:
    Tuple of [N, H, W, K] float32 side logits (CASENet: (side5,) for 'original', five for 'urisc').

  Raises:
    ValueError: the model sowed no side logits, so deep supervision cannot apply.
  """
  sides = mutable_state.get("intermediates", {}).get("side_logits")
  if not sides:
    raise ValueError("config.loss.deep_supervision=True needs a model that sows side logits "
                     "(model.name='casenet'); set config.loss.deep_supervision=False for this model.")
  return tuple(sides)


def deeply_supervised(
    loss_fn: LossFn,
    logits: jax.Array,
    labels: jax.Array,
    sides: Sequence[jax.Array],
    *,
    side_weight: float = 1.0,
) -> jax.Array:
  """Deep supervision: loss_fn(fused) + side_weight * sum_i loss_fn(side_i), every output against the same labels.

  CASENet's recipe (with `class_balanced_bce`): the side outputs get their own supervision so that the early layers
  learn edges directly instead of only through the fusion layer. Use with

      fused, state = model.apply(variables, x, train=True, mutable=["batch_stats", "intermediates"])
      loss = deeply_supervised(loss_fn, fused, labels, side_logits(state))

  Args:
    loss_fn: loss(logits, labels) -> scalar, e.g. `from_config(config.loss)`.
    logits: [N, H, W, K] fused logits.
    labels: [N, H, W, K] targets in {0, 1}.
    sides: side logits, each [N, H, W, K] (at the labels' size).
    side_weight: weight of every side loss relative to the fused one.

  Returns:
    Scalar.
  """
  total = loss_fn(logits, labels)
  for side in sides:
    if side.shape != logits.shape:
      raise ValueError(f"side logits of shape {side.shape} do not match the fused logits {logits.shape}: "
                       "deep supervision needs side outputs upsampled to the input size.")
    total = total + side_weight * loss_fn(side, labels)
  return total


def _options_of(loss_fn: LossFn) -> set[str]:
  return {name for name, p in inspect.signature(loss_fn).parameters.items() if p.kind is p.KEYWORD_ONLY}


def from_config(loss_config) -> LossFn:
  """Returns loss(logits, labels) -> scalar from `config.loss`: its `name` and that loss's keyword options.

  Options that belong to other losses (e.g. `gamma` when name='dice') are ignored, so one config block can switch
  losses by name; a key that no loss knows raises. `deep_supervision` is read by the train step, not here.

  Args:
    loss_config: mapping with `name` in LOSSES plus options, e.g. {"name": "focal_dice", "gamma": 2.0}.

  Returns:
    The configured loss function.
  """
  options = dict(loss_config)
  name = options.get("name")
  if name not in LOSSES:
    raise ValueError(f"Unknown loss {name!r}: set config.loss.name to one of {sorted(LOSSES)}.")
  known = set().union(*(_options_of(fn) for fn in LOSSES.values()))
  unknown = sorted(set(options) - known - set(_NON_LOSS_KEYS))
  if unknown:
    raise ValueError(f"Unknown config.loss option(s) {unknown}: the losses take {sorted(known)} "
                     f"(plus {list(_NON_LOSS_KEYS)}).")
  loss_fn = LOSSES[name]
  accepted = _options_of(loss_fn)
  return functools.partial(loss_fn, **{k: v for k, v in options.items() if k in accepted})
