"""Optimizers and learning-rate schedules built from config (the paper: Adam)."""

import optax

SCHEDULES = ("constant", "cosine")
OPTIMIZERS = ("adam", "adamw")


def schedule_from_config(optim_config, num_steps: int) -> optax.Schedule:
  """Learning rate per step: linear warm-up over `warmup_steps`, then constant or cosine decay to `end_lr_factor`."""
  peak = optim_config.learning_rate
  warmup = min(optim_config.warmup_steps, max(num_steps - 1, 0))
  name = optim_config.schedule
  if name == "constant":
    after = optax.constant_schedule(peak)
  elif name == "cosine":
    after = optax.cosine_decay_schedule(peak, max(num_steps - warmup, 1), alpha=optim_config.end_lr_factor)
  else:
    raise ValueError(f"Unknown schedule {name!r}: set config.optim.schedule to one of {SCHEDULES}.")
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def optimizer_from_config(optim_config, num_steps: int) -> optax.GradientTransformation:
  """Adam (paper) or AdamW with the configured schedule and optional global-norm gradient clipping."""
  learning_rate = schedule_from_config(optim_config, num_steps)
  name = optim_config.name
  if name == "adam":
    tx = optax.adam(learning_rate)
  elif name == "adamw":
    tx = optax.adamw(learning_rate, weight_decay=optim_config.weight_decay)
  else:
    raise ValueError(f"Unknown optimizer {name!r}: set config.optim.name to one of {OPTIMIZERS}.")
  if optim_config.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(optim_config.grad_clip_norm), tx)
  return tx
