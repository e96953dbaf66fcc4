"""urisc_jax: cell-membrane segmentation of ultra-high-resolution EM images (U-RISC) in JAX/Flax.

The public API: the names in `__all__`, listed with one line each in docs/api.md. Shapes are NHWC: images [N, H, W, C]
(C = 1 gray), logits float32 [N, H, W, K] (K = 1 membrane logit); H and W multiples of `input_multiple(name)`.

    import jax, optax, urisc_jax

    model = urisc_jax.build_model("unet", encoder="resnet18", in_channels=1, num_classes=1)
    variables = urisc_jax.init_variables(model, (8, 256, 256, 1))      # {'params', 'batch_stats'}
    logits = model.apply(variables, x, train=False)                     # [8, 256, 256, 1] float32
    loss = urisc_jax.focal_dice(logits, labels, gamma=2.0)             # pure, optax style: a scalar
    step = urisc_jax.make_train_step(model, optax.adam(1e-3), urisc_jax.focal_dice, mean=0.5, std=0.2)

Importing the package loads none of its modules (each name is imported on first use) and changes no global state:
`python -m urisc_jax.main` sets the project's XLA:CPU options before JAX starts, and a script that wants them calls
`urisc_jax.configure_xla_cpu()` before its first JAX computation. Per-example gradients (`jax.vmap(jax.grad(...))`)
need the model in eval mode (`train=False`): in train mode BatchNorm normalizes with the statistics of the batch,
which couples the examples.
"""

import importlib
import typing

__version__ = "0.1.0"

# Public name -> (module, attribute). Modules are imported on first access (PEP 562), so that `import urisc_jax`
# stays cheap and pulls in neither JAX nor the data, logging and volume libraries.
_EXPORTS = {
    # XLA:CPU
    "configure_xla_cpu": ("urisc_jax.xla_flags", "apply"),
    # Models and their variables
    "build_model": ("urisc_jax.models", "build"),
    "register_model": ("urisc_jax.models", "register"),
    "available_models": ("urisc_jax.models", "available"),
    "input_multiple": ("urisc_jax.models", "input_multiple"),
    "init_variables": ("urisc_jax.models", "init_variables"),
    "abstract_variables": ("urisc_jax.models", "abstract_variables"),
    "count_params": ("urisc_jax.models", "count_params"),
    # Losses
    "sigmoid_focal": ("urisc_jax.losses", "sigmoid_focal"),
    "soft_dice": ("urisc_jax.losses", "soft_dice"),
    "focal_dice": ("urisc_jax.losses", "focal_dice"),
    "binary_cross_entropy": ("urisc_jax.losses", "binary_cross_entropy"),
    "class_balanced_bce": ("urisc_jax.losses", "class_balanced_bce"),
    "soft_f1": ("urisc_jax.losses", "soft_f1"),
    "deeply_supervised": ("urisc_jax.losses", "deeply_supervised"),
    "side_logits": ("urisc_jax.losses", "side_logits"),
    "loss_from_config": ("urisc_jax.losses", "from_config"),
    "register_loss": ("urisc_jax.losses", "register"),
    # Training
    "TrainState": ("urisc_jax.state", "TrainState"),
    "optimizer_from_config": ("urisc_jax.optim", "optimizer_from_config"),
    "make_train_step": ("urisc_jax.train", "make_train_step"),
    "train_and_evaluate": ("urisc_jax.train", "train_and_evaluate"),
    # Sliding-window prediction
    "make_tile_forward": ("urisc_jax.inference", "make_tile_forward"),
    "predict_logits": ("urisc_jax.inference", "predict_logits"),
    "probabilities": ("urisc_jax.inference", "probabilities"),
    # Metrics
    "official_f1": ("urisc_jax.evaluation.f1", "official_f1"),
    "score_folders": ("urisc_jax.evaluation.f1", "score_folders"),
    # Attribution
    "ModelLogits": ("urisc_jax.attribution.integrated_gradients", "ModelLogits"),
    "integrated_gradients": ("urisc_jax.attribution.integrated_gradients", "integrated_gradients"),
    "make_baseline": ("urisc_jax.attribution.integrated_gradients", "make_baseline"),
    "attribute_image": ("urisc_jax.attribution.integrated_gradients", "attribute_image"),
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'urisc_jax' has no attribute {name!r}")
  module, attribute = _EXPORTS[name]
  value = getattr(importlib.import_module(module), attribute)
  globals()[name] = value  # later accesses skip this function
  return value


def __dir__() -> list[str]:
  return sorted({*globals(), *_EXPORTS})


if typing.TYPE_CHECKING:  # what type checkers and IDEs see; nothing runs
  # pylint: disable=g-import-not-at-top,unused-import
  from urisc_jax.attribution.integrated_gradients import ModelLogits, attribute_image, integrated_gradients
  from urisc_jax.attribution.integrated_gradients import make_baseline
  from urisc_jax.evaluation.f1 import official_f1, score_folders
  from urisc_jax.inference import make_tile_forward, predict_logits, probabilities
  from urisc_jax.losses import binary_cross_entropy, class_balanced_bce, deeply_supervised, focal_dice, side_logits
  from urisc_jax.losses import from_config as loss_from_config
  from urisc_jax.losses import register as register_loss
  from urisc_jax.losses import sigmoid_focal, soft_dice, soft_f1
  from urisc_jax.models import abstract_variables, count_params, init_variables, input_multiple
  from urisc_jax.models import available as available_models
  from urisc_jax.models import build as build_model
  from urisc_jax.models import register as register_model
  from urisc_jax.optim import optimizer_from_config
  from urisc_jax.state import TrainState
  from urisc_jax.train import make_train_step, train_and_evaluate
  from urisc_jax.xla_flags import apply as configure_xla_cpu
