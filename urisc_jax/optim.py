"""Optimizers and learning-rate schedules built from `config.optim` (the paper: Adam).

    tx = optimizer_from_config(config.optim, num_steps)    # optax.GradientTransformation
    lr = schedule_from_config(config.optim, num_steps)     # learning rate at train step t, for logging

The transformation is, outermost first: gradient accumulation over `accumulate_steps` train steps (optax.MultiSteps,
which averages the micro-batch gradients and updates once), global-norm clipping of that average, the optimizer with
its schedule, and the encoder's learning-rate multiplier. `num_steps` always counts train steps (micro-batches):
with accumulate_steps = k the optimizer updates num_steps // k times and the schedule is laid over those updates.

config.optim keys (the ones marked * are optional, with the default shown, so older configs still build):
  name: "adam" (paper) | "adamw" (decoupled weight_decay) | "sgd" (with momentum*=0.9, 0 = plain SGD).
  learning_rate: peak learning rate.
  schedule: "constant" | "cosine" | "poly" | "one_cycle" (see `schedule_from_config`).
  warmup_steps: linear warm-up from 0 to the peak, in optimizer updates (not used by one_cycle).
  end_lr_factor: final learning rate / peak for cosine, poly and one_cycle.
  weight_decay: AdamW's decoupled weight decay.
  grad_clip_norm: clip the gradient's global norm to this (0 = off).
  poly_power*: 0.9, the exponent of "poly" (DeepLab's schedule).
  one_cycle_pct_start*: 0.3, the fraction of updates over which one_cycle rises.
  one_cycle_div_factor*: 25.0, one_cycle starts at peak / this.
  encoder_lr_multiplier*: 1.0; the encoder (params["encoder"]) learns at learning_rate * this while the decoder,
    head (CASENet: sides, fuse, fuse_bn) learn at learning_rate, e.g. 0.1 for a pretrained encoder.
  accumulate_steps*: 1, train steps whose gradients are averaged into one update.
"""

from typing import Any

import jax
import optax

SCHEDULES = ("constant", "cosine", "poly", "one_cycle")
OPTIMIZERS = ("adam", "adamw", "sgd")
ENCODER, OTHER = "encoder", "decoder_and_head"

_DEFAULTS = {
    "poly_power": 0.9,
    "one_cycle_pct_start": 0.3,
    "one_cycle_div_factor": 25.0,
    "encoder_lr_multiplier": 1.0,
    "accumulate_steps": 1,
    "momentum": 0.9,
    "weight_decay": 0.0,
    "grad_clip_norm": 0.0,
    "warmup_steps": 0,
    "end_lr_factor": 0.0,
}


def _option(optim_config, key: str) -> Any:
  """config.optim[key], or its default for optional keys (plain dicts and ConfigDicts alike)."""
  if key in optim_config:
    return optim_config[key]
  if key in _DEFAULTS:
    return _DEFAULTS[key]
  raise ValueError(f"config.optim.{key} is missing: add it to the config (see urisc_jax/optim.py).")


def accumulate_steps(optim_config) -> int:
  """Train steps per optimizer update (>= 1)."""
  k = int(_option(optim_config, "accumulate_steps"))
  if k < 1:
    raise ValueError(f"config.optim.accumulate_steps={k} must be >= 1 (1 = update every step).")
  return k


def update_schedule(optim_config, num_updates: int) -> optax.Schedule:
  """Learning rate per optimizer update, over `num_updates` updates.

  All schedules but one_cycle rise linearly from 0 to `learning_rate` over `warmup_steps` (capped below
  num_updates), then:
    constant:  stay at the peak;
    cosine:    cosine decay to peak * end_lr_factor at the last update;
    poly:      peak * end + (peak - peak * end) * (1 - t / T)^poly_power, T the updates after warm-up;
  one_cycle (Smith & Topin 2019, with a linear rise): from peak / one_cycle_div_factor up to the peak over
  one_cycle_pct_start of the updates, then cosine decay to peak * end_lr_factor.

  Args:
    optim_config: config.optim.
    num_updates: optimizer updates in the run.

  Returns:
    An optax schedule, step -> learning rate.
  """
  peak = float(_option(optim_config, "learning_rate"))
  end = peak * float(_option(optim_config, "end_lr_factor"))
  name = _option(optim_config, "schedule")
  if name not in SCHEDULES:
    raise ValueError(f"Unknown schedule {name!r}: set config.optim.schedule to one of {SCHEDULES}.")
  last = max(num_updates - 1, 0)
  if name == "one_cycle":
    rise = min(int(round(float(_option(optim_config, "one_cycle_pct_start")) * num_updates)), last)
    start = peak / float(_option(optim_config, "one_cycle_div_factor"))
  else:
    rise = min(int(_option(optim_config, "warmup_steps")), last)
    start = 0.0
  decay_steps = max(num_updates - rise, 1)
  if name == "constant":
    after = optax.constant_schedule(peak)
  elif name == "cosine" or name == "one_cycle":
    after = optax.cosine_decay_schedule(peak, decay_steps, alpha=float(_option(optim_config, "end_lr_factor")))
  else:  # poly
    after = optax.polynomial_schedule(peak, end, float(_option(optim_config, "poly_power")), decay_steps)
  if rise == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(start, peak, rise), after], [rise])


def schedule_from_config(optim_config, num_steps: int) -> optax.Schedule:
  """Learning rate at each train step (for logging): the update schedule, stretched by `accumulate_steps`.

  Args:
    optim_config: config.optim.
    num_steps: train steps (micro-batches) in the run.

  Returns:
    step -> learning rate of the update that train step `step` contributes to.
  """
  k = accumulate_steps(optim_config)
  inner = update_schedule(optim_config, max(num_steps // k, 1))
  if k == 1:
    return inner
  return lambda step: inner(step // k)


def param_group(params: Any) -> Any:
  """Labels every leaf of a params tree ENCODER (under the top-level 'encoder') or OTHER (decoder, head, sides...).

  Raises:
    ValueError: the tree has no top-level 'encoder' to scale.
  """
  if ENCODER not in params:
    raise ValueError(f"config.optim.encoder_lr_multiplier needs a model whose params have an 'encoder'; this one "
                     f"has {sorted(params)}: set config.optim.encoder_lr_multiplier=1.0.")
  return {key: jax.tree.map(lambda _, k=key: ENCODER if k == ENCODER else OTHER, subtree)
          for key, subtree in params.items()}


def _base_optimizer(optim_config, learning_rate: optax.Schedule) -> optax.GradientTransformation:
  name = _option(optim_config, "name")
  if name == "adam":
    return optax.adam(learning_rate)
  if name == "adamw":
    return optax.adamw(learning_rate, weight_decay=float(_option(optim_config, "weight_decay")))
  if name == "sgd":
    momentum = float(_option(optim_config, "momentum"))
    return optax.sgd(learning_rate, momentum=momentum or None)
  raise ValueError(f"Unknown optimizer {name!r}: set config.optim.name to one of {OPTIMIZERS}.")


def optimizer_from_config(optim_config, num_steps: int) -> optax.GradientTransformation:
  """Adam (paper), AdamW or SGD with the configured schedule, clipping, encoder multiplier and accumulation.

  Args:
    optim_config: config.optim (see the module docstring for its keys).
    num_steps: train steps (micro-batches) in the run.

  Returns:
    The optax transformation; its state's structure depends only on the config, so checkpoints restore with it.
  """
  k = accumulate_steps(optim_config)
  tx = _base_optimizer(optim_config, update_schedule(optim_config, max(num_steps // k, 1)))
  multiplier = float(_option(optim_config, "encoder_lr_multiplier"))
  if multiplier != 1.0:
    # Scaling an update scales its learning rate (and AdamW's decay, which optax multiplies by it too).
    tx = optax.chain(tx, optax.multi_transform({ENCODER: optax.scale(multiplier), OTHER: optax.identity()},
                                               param_group))
  clip = float(_option(optim_config, "grad_clip_norm"))
  if clip:
    tx = optax.chain(optax.clip_by_global_norm(clip), tx)
  if k > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=k).gradient_transformation()
  return tx
