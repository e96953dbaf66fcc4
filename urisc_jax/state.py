"""The training state and how it is made: model from config, parameters initialised directly in their sharding."""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from urisc_jax import models, platforms, sharding


@struct.dataclass
class TrainState:
  """Everything a step changes. `opt_state` holds optax's state; `batch_stats` BatchNorm's running statistics."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def build_model(model_config, *, auto_dtype=None) -> nn.Module:
  """The configured model for 1-channel gray input and 1 membrane logit: `models.build(name, **overrides)`.

  `model.dtype="auto"` computes in bfloat16 on GPUs and TPUs and float32 on the CPU (`platforms.compute_dtype`), or
  in `auto_dtype` where the caller needs another precision (attribution: float32 everywhere).
  """
  overrides = {k: v for k, v in model_config.items() if k != "name"}
  if "dtype" in overrides:
    auto = overrides["dtype"] == "auto"
    overrides["dtype"] = jnp.dtype(auto_dtype) if auto and auto_dtype is not None else platforms.compute_dtype(
        overrides["dtype"])
  return models.build(model_config.name, in_channels=1, num_classes=1, **overrides)


def init_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array, crop_size: int) -> TrainState:
  """Fresh parameters (from a [1, S, S, 1] example input) and optimizer state at step 0."""
  variables = model.init(rng, jnp.zeros((1, crop_size, crop_size, 1), jnp.float32), train=False)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables.get("batch_stats", {}),
                    opt_state=tx.init(params))


def create_state(model, tx, mesh, rng, crop_size) -> tuple[TrainState, Any]:
  """Initializes the state directly in its sharded layout (replicated); returns (state, state_shardings)."""
  init = functools.partial(init_state, model, tx, crop_size=crop_size)
  abstract = jax.eval_shape(init, rng)
  shardings = jax.tree.map(lambda _: sharding.replicated(mesh), abstract)
  return jax.jit(init, out_shardings=shardings)(rng), shardings


def load_pretrained_encoder(state: TrainState, path: str, shardings: Any) -> tuple[TrainState, Any]:
  """Replaces the encoder's params and batch_stats with a PyTorch ResNet checkpoint's (e.g. CEM500K MoCoV2).

  The paper's U-Net-transfer recipe. Tensors are matched by name and shape; anything missing, unexpected or
  mis-shaped raises an error naming it (see `models.torch_import`).

  Returns:
    (state placed with `shardings`, LoadInfo whose `normalization` is the checkpoint's input normalization or None).
  """
  from urisc_jax.models import torch_import  # Only transfer runs read torch checkpoints.
  host = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
  variables, info = torch_import.load_encoder_weights(host, path)
  state = state.replace(params=variables["params"], batch_stats=variables["batch_stats"])
  return jax.device_put(state, shardings), info
